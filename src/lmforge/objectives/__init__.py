"""Training objectives: `loss(model, batch) -> (scalar loss, metrics)`; the engine runs any of them."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn


class Objective(Protocol):
    """What the trainer calls for every micro batch; it may hold frozen modules (reference, teacher)."""

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        ...
