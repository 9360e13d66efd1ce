"""What a training stage writes around `Trainer.fit()`: the evaluation summary (eval.json) and the lineage record
(lmforge.json), the same way for every stage that tunes a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["start", "fit", "eval_summary", "lineage", "write_lineage"]


def start(cfg):
    """(world, run directory) of a training stage: the process group from cfg.train.device, and the resolved config
    written to RUN_DIR/config.yaml by the main process. Settings that only make sense together are checked first."""
    from ..config import ConfigError, save_config
    from . import distributed as D

    warmup, steps = cfg.train.schedule.warmup_steps, cfg.train.steps
    if warmup > steps:
        raise ConfigError(f"train.schedule.warmup_steps: found {warmup}, more than train.steps {steps}; expected at "
                          f"most train.steps (the warmup would never end)")
    world = D.init(cfg.train.device)
    run = Path(cfg.run_dir)
    if world.main:
        save_config(cfg, run / "config.yaml")
    return world, run


def fit(trainer) -> dict[str, Any] | None:
    """`trainer.fit()`; None when a signal stopped it (its checkpoint is saved and the message printed). Under FSDP
    the full weights are gathered into the main process's model afterwards, ready to save."""
    try:
        last = trainer.fit()
    except KeyboardInterrupt as e:
        if trainer.world.main:
            print(str(e))
        return None
    if trainer.cfg.parallel == "fsdp" and trainer.world.world > 1:
        sd = trainer.export_state_dict()
        if trainer.world.main:
            trainer.model.load_state_dict(sd, strict=False)
    return last


def eval_summary(trainer, last: dict[str, Any]) -> dict[str, Any]:
    """The last validation metrics and, when the run evaluated at step 0 (`eval_at_start`), those as `before`
    (for a resumed run, read back from its metrics.jsonl)."""
    from .metrics import read_metrics

    out: dict[str, Any] = {"step": trainer.step, **{k: v for k, v in last.items() if k.startswith("val_")}}
    start = next((h for h in trainer.history if h.get("step") == 0), None)
    if start is None and (trainer.run_dir / "metrics.jsonl").exists():
        start = next((r for r in read_metrics(trainer.run_dir) if r.get("step") == 0), None)
    if start is not None:
        out["before"] = {k: v for k, v in start.items() if k.startswith("val_")}
    return out


def lineage(stage: str, cfg, parent: str, trainable: int, total: int, **extra: Any) -> dict[str, Any]:
    """The lineage record of a run: stage, parent model, parameter counts, config hash, package version, config."""
    from ..version import __version__
    from ..config import config_hash, to_dict

    return {"stage": stage, **extra, "config_hash": config_hash(cfg), "parent": parent,
            "trainable_parameters": trainable, "total_parameters": total, "lmforge": __version__,
            "config": to_dict(cfg)}


def write_lineage(record: dict[str, Any], *folders: Path) -> None:
    """Write `record` as lmforge.json into each folder (the run directory and its final/)."""
    text = json.dumps(record, indent=2) + "\n"
    for folder in folders:
        (Path(folder) / "lmforge.json").write_text(text)
