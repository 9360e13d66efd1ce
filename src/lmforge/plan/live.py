"""The memory a plan is checked against: the high-water mark of live tensor storage bytes (what the planner models,
without the allocator's and the runtime's own overhead that a process's RSS adds). Tensor subclasses (DTensor under
tensor parallelism and FSDP2) are counted by their local storages."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensors"]


def _storages(t: torch.Tensor) -> list[Any]:
    """The storages behind `t`: its own, or those of a wrapper subclass's inner tensors (`__tensor_flatten__`)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        inner = [getattr(t, n) for n in names]
        return [s for x in inner if isinstance(x, torch.Tensor) for s in _storages(x)]
    return [t.untyped_storage()]


class LiveTensors(TorchDispatchMode):
    """`with live:` follows every tensor storage an op creates until it is freed; `live.peak` is the high-water mark
    of their bytes since the last `reset_peak()`, `live.live` the bytes alive now. Sizes are read afresh after each
    op, because FSDP2 frees and re-allocates its gathered parameters by resizing their storages in place."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for storage in _storages(t):
                    key = id(storage)
                    if key not in self.storages:
                        self.storages[key] = weakref.ref(storage, lambda _, k=key: self.storages.pop(k, None))
        self.live = sum(s.nbytes() for r in list(self.storages.values()) if (s := r()) is not None)
        self.peak = max(self.peak, self.live)
        return out
