"""The planner: parameters, FLOPs, memory per parallelism and Chinchilla sizing from a model config alone (floor 2:
it reads `models` configs and builds no weights). See docs/scaling.md."""

from .counts import (
    ParameterCount,
    TrainableCount,
    count_parameters,
    parameter_shapes,
    trainable_parameters,
)

__all__ = ["ParameterCount", "TrainableCount", "count_parameters", "parameter_shapes", "trainable_parameters"]
