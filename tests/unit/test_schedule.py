"""Tests for lmforge.engine.schedule: milestone values from the formulas, the LambdaLR driver,
exact resume, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmforge.config import ConfigError, field_docs, load_config
from lmforge.engine.schedule import ScheduleConfig, build_scheduler, lr_multiplier

TOTAL, WARM, MIN = 100, 10, 0.1


def cfg(name: str, **kw) -> ScheduleConfig:
    kw.setdefault("warmup_steps", WARM)
    kw.setdefault("min_lr_ratio", MIN)
    return ScheduleConfig(name=name, **kw)


def cos_at(progress: float) -> float:
    return MIN + (1 - MIN) * 0.5 * (1 + math.cos(math.pi * progress))


# step -> expected multiplier, each worked out by hand for TOTAL=100, WARM=10, MIN=0.1
MILESTONES = {
    "constant": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 55: 1.0, 99: 1.0, 100: 1.0, 250: 1.0},
    "linear": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0,
               28: 1 - 0.9 * 18 / 90,          # 0.82
               55: 0.55,                        # halfway through the decay
               99: 1 - 0.9 * 89 / 90,
               100: 0.1, 250: 0.1},
    "cosine": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0,
               28: 0.1 + 0.45 * (1 + math.cos(0.2 * math.pi)),   # ≈ 0.914058
               55: 0.55,
               100: 0.1, 250: 0.1},
    # wsd, decay_fraction 0.2: stable until step 80, then linear to 0.1 at step 100
    "wsd": {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 55: 1.0, 80: 1.0, 85: 1 - 0.9 * 0.25, 90: 0.55,
            99: 1 - 0.9 * 19 / 20, 100: 0.1, 250: 0.1},
}


@pytest.mark.parametrize("name", sorted(MILESTONES))
def test_milestones(name):
    c = cfg(name)
    for step, expected in MILESTONES[name].items():
        assert lr_multiplier(step, TOTAL, c) == pytest.approx(expected, abs=1e-12), (name, step)


def test_cosine_curve_matches_formula_everywhere():
    c = cfg("cosine")
    for s in range(WARM, TOTAL + 1):
        assert lr_multiplier(s, TOTAL, c) == pytest.approx(cos_at((s - WARM) / (TOTAL - WARM)), abs=1e-12)
    assert lr_multiplier(28, TOTAL, c) == pytest.approx(0.9140576474687264, abs=1e-12)


def test_no_warmup_starts_at_peak_and_min_ratio_zero():
    assert lr_multiplier(0, TOTAL, cfg("cosine", warmup_steps=0)) == 1.0
    assert lr_multiplier(0, TOTAL, cfg("linear", warmup_steps=0)) == 1.0
    assert lr_multiplier(50, TOTAL, cfg("linear", warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(0.5)
    assert lr_multiplier(TOTAL, TOTAL, cfg("cosine", min_lr_ratio=0.0)) == pytest.approx(0.0, abs=1e-15)


def test_wsd_edges():
    # no decay phase: stable to the end, min only at total_steps
    c0 = cfg("wsd", decay_fraction=0.0)
    assert lr_multiplier(99, TOTAL, c0) == 1.0 and lr_multiplier(TOTAL, TOTAL, c0) == pytest.approx(MIN)
    # decay would start inside warmup: it starts when warmup ends instead
    c = cfg("wsd", warmup_steps=90, decay_fraction=0.2)
    assert lr_multiplier(89, TOTAL, c) == 1.0 and lr_multiplier(90, TOTAL, c) == 1.0
    assert lr_multiplier(95, TOTAL, c) == pytest.approx(0.55)
    # whole run decays (fraction 1) == linear from step 0 when there is no warmup
    lin, full = cfg("linear", warmup_steps=0), cfg("wsd", warmup_steps=0, decay_fraction=1.0)
    for s in (0, 13, 50, 77, 100):
        assert lr_multiplier(s, TOTAL, full) == pytest.approx(lr_multiplier(s, TOTAL, lin))


def _expected(step: int, name: str) -> float:
    """An independent, step-by-step restatement of the schedule for TOTAL/WARM/MIN."""
    if step < WARM:
        return (step + 1) / WARM
    p = min((step - WARM) / (TOTAL - WARM), 1.0)
    return {"constant": 1.0, "linear": 1 - (1 - MIN) * p, "cosine": cos_at(p)}[name]


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_build_scheduler_drives_every_group(name):
    peak = 0.5
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=peak)
    sched = build_scheduler(opt, TOTAL, cfg(name))
    for s in range(TOTAL + 5):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(peak * _expected(s, name), abs=1e-12), (name, s)
        opt.step()
        sched.step()


def test_scheduler_resume_is_exact():
    def make():
        p = nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([p], lr=1e-3)
        return opt, build_scheduler(opt, TOTAL, cfg("cosine"))

    opt_a, sched_a = make()
    for _ in range(30):
        opt_a.step()
        sched_a.step()
    saved = {"opt": opt_a.state_dict(), "sched": sched_a.state_dict()}
    opt_b, sched_b = make()
    opt_b.load_state_dict(saved["opt"])
    sched_b.load_state_dict(saved["sched"])
    assert sched_b.last_epoch == 30
    for s in range(30, 60):
        assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
        assert opt_b.param_groups[0]["lr"] == pytest.approx(1e-3 * _expected(s, "cosine"), abs=1e-15)
        for opt, sched in ((opt_a, sched_a), (opt_b, sched_b)):
            opt.step()
            sched.step()


@pytest.mark.parametrize("kwargs, key", [
    ({"warmup_steps": -1}, "warmup_steps"), ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"min_lr_ratio": -0.1}, "min_lr_ratio"), ({"decay_fraction": 1.2}, "decay_fraction"),
    ({"decay_fraction": -0.2}, "decay_fraction"), ({"name": "step"}, "name"),
])
def test_validate_rejects(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ScheduleConfig(**kwargs).validate()


def test_build_scheduler_errors_and_config_loading():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(opt, 0, ScheduleConfig())
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(opt, 10, ScheduleConfig(warmup_steps=11))
    with pytest.raises(ValueError, match="min_lr_ratio"):
        build_scheduler(opt, 10, ScheduleConfig(min_lr_ratio=2.0))
    with pytest.raises(ValueError, match="total_steps"):
        lr_multiplier(0, 0, ScheduleConfig())
    ScheduleConfig().validate()
    with pytest.raises(ConfigError, match="decay_fraction"):
        load_config(ScheduleConfig, overrides=["decay_fraction=3"])
    c = load_config(ScheduleConfig, overrides=["name=wsd", "warmup_steps=5"])
    assert (c.name, c.warmup_steps) == ("wsd", 5)
    assert set(field_docs(ScheduleConfig)) == {"name", "warmup_steps", "min_lr_ratio", "decay_fraction"}
