"""Learning-rate schedules: linear warmup, then constant, linear, cosine or warmup-stable-decay.

``lr_multiplier(step, total_steps, cfg)`` is a pure function of the step, so a scheduler built
from it (``build_scheduler``) resumes exactly from its ``state_dict()``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["ScheduleConfig", "lr_multiplier", "build_scheduler", "SCHEDULES"]

SCHEDULES = ("constant", "linear", "cosine", "wsd")


@dataclass
class ScheduleConfig:
    """Shape of the learning rate over training, as a multiple of the optimizer's peak lr."""

    name: Literal["constant", "linear", "cosine", "wsd"] = "cosine"
    """After warmup: constant, linear decay, cosine decay, or wsd (warmup-stable-decay)."""
    warmup_steps: int = 0
    """Steps of linear warmup from lr/warmup_steps up to the peak lr."""
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of the peak lr (linear, cosine and wsd)."""
    decay_fraction: float = 0.2
    """wsd only: share of the total steps, at the end, spent decaying to min_lr_ratio."""

    def validate(self) -> None:
        """Raise ValueError on values no schedule can run with."""
        if self.name not in SCHEDULES:
            raise ValueError(f"name: expected one of {', '.join(SCHEDULES)}, found {self.name!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, found {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio: expected a number in [0, 1], found {self.min_lr_ratio}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction: expected a number in [0, 1], found {self.decay_fraction}")


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleConfig) -> float:
    """Factor on the peak lr for the update at 0-based ``step`` of a ``total_steps`` run.

    Warmup: step ``s < warmup_steps`` gives ``(s + 1) / warmup_steps`` (so step 0 already moves,
    by 1/warmup, and the last warmup step reaches 1). After it, with
    ``progress = (s - warmup) / (total_steps - warmup)`` clamped to [0, 1] and ``m = min_lr_ratio``:
    constant ``1``; linear ``1 - (1 - m) · progress``; cosine ``m + (1 - m) · ½(1 + cos(π · progress))``;
    wsd ``1`` until ``total_steps · (1 - decay_fraction)`` (never before warmup ends), then linear
    to ``m``. The value ``m`` is reached at ``step == total_steps`` and held after it.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps: expected an integer >= 1, found {total_steps}")
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "constant":
        return 1.0
    m = cfg.min_lr_ratio
    if cfg.name == "wsd":
        start = max(float(warmup), total_steps * (1.0 - cfg.decay_fraction))
    else:
        start = float(warmup)
    span = total_steps - start
    if span <= 0:  # no room to decay (wsd with decay_fraction 0, or warmup == total_steps)
        progress = 1.0 if step >= total_steps else 0.0
    else:
        progress = min(max((step - start) / span, 0.0), 1.0)
    if cfg.name == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - m) * progress  # linear, and the decay phase of wsd


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    cfg: ScheduleConfig) -> LambdaLR:
    """A ``LambdaLR`` applying ``lr_multiplier`` to every param group's lr.

    Call ``scheduler.step()`` after each ``optimizer.step()``; the lr for update ``s`` is
    ``peak · lr_multiplier(s, total_steps, cfg)``. Its ``state_dict()`` (step count, base lrs)
    restores the schedule exactly.
    """
    cfg.validate()
    if total_steps < 1:
        raise ValueError(f"total_steps: expected an integer >= 1, found {total_steps}")
    if cfg.warmup_steps > total_steps:
        raise ValueError(f"warmup_steps: {cfg.warmup_steps} is more than the {total_steps} "
                         f"total steps of the run")
    return LambdaLR(optimizer, functools.partial(lr_multiplier, total_steps=total_steps, cfg=cfg))
