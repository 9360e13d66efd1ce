"""The precision context of a forward pass: autocast to bf16 / fp16, or nothing for fp32. The trainer and the RL
rollouts both use it, so log-probs computed while sampling match those of the training forward. Floor 0."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast"]


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A fresh context for `precision` ("fp32", "bf16" or "fp16") on `device`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)
