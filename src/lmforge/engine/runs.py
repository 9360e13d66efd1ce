"""The life of a training run, the same for every stage that trains a model (pretrain, finetune, dpo, reward, ppo,
grpo): `start` (process group, config.yaml), then the stage builds its model, data and objective, then `finish`
(fit; exit 130 on a signal; eval.json, final/, the lineage record lmforge.json, a summary; shutdown)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

__all__ = ["start", "fit", "finish", "eval_summary", "lineage", "write_lineage"]


def start(cfg):
    """(world, run directory) of a training stage: the process group from cfg.train.device, and the resolved config
    written to RUN_DIR/config.yaml by the main process. Settings that only make sense together are checked first."""
    from ..config import ConfigError, save_config
    from . import distributed as D

    warmup, steps = cfg.train.schedule.warmup_steps, cfg.train.steps
    if warmup > steps:
        raise ConfigError(f"train.schedule.warmup_steps: found {warmup}, more than train.steps {steps}; expected at "
                          f"most train.steps (the warmup would never end)")
    world = D.init(cfg.train.device, cfg.train.parallel.tp)
    run = Path(cfg.run_dir)
    if world.main:
        save_config(cfg, run / "config.yaml")
    return world, run


def fit(trainer, load_full: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """(last logged metrics, full weights or None): `trainer.fit()`, then under multi-process FSDP the full weights
    gathered from every rank (a collective) and, with `load_full`, loaded into the main process's model, ready to
    save. None when a signal stopped the run (its checkpoint is saved and the message printed)."""
    try:
        last = trainer.fit()
    except KeyboardInterrupt as e:
        if trainer.world.main:
            print(str(e))
        return None
    full = None
    if trainer.sharded:
        full = trainer.export_state_dict()
        if trainer.world.main and load_full:
            trainer.model.load_state_dict(full, strict=False)
    return last, full


def finish(trainer, stage: str, cfg, save: Callable[[dict[str, Any] | None], Path], summary: Callable[[dict], str],
           trainable: int, total: int, result: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
           title: str | None = None, load_full: bool = True, **lineage_extra: Any) -> int:
    """The end of every training stage: fit, then on the main process eval.json (`result(last)`, by default
    `eval_summary`), `save(full weights or None) -> final/`, the lineage in the run directory and final/, and one
    line `TITLE: N steps; summary; saved FINAL` (title: the stage name, or e.g. "finetune (sft, lora)"); then the
    process group shuts down. Returns the exit code: 0, or 130 when a signal stopped the run. `load_full=False`:
    under FSDP the gathered weights only go to `save` (which builds a fresh model from them), not into the sharded
    model."""
    from . import distributed as D

    fitted = fit(trainer, load_full)
    if fitted is None:
        return 130
    last, full = fitted
    if trainer.world.main:
        res = result(last) if result is not None else eval_summary(trainer, last)
        final = save(full)
        record = lineage(stage, cfg, getattr(cfg.model, "init_from", None), trainable, total, **lineage_extra)
        write_lineage(record, trainer.run_dir, final)
        trainer.write_json("eval.json", res)
        print(f"{title or stage}: {trainer.step} steps; {summary(res)}; saved {final}")
    D.shutdown()
    return 0


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
    from ..config import config_hash, to_dict
    from ..version import __version__

    return {"stage": stage, **extra, "config_hash": config_hash(cfg), "parent": parent,
            "trainable_parameters": trainable, "total_parameters": total, "lmforge": __version__,
            "config": to_dict(cfg)}


def write_lineage(record: dict[str, Any], *folders: Path) -> None:
    """Write `record` as lmforge.json into each folder (the run directory and its final/), atomically."""
    from ..atomic import write_text

    text = json.dumps(record, indent=2) + "\n"
    for folder in folders:
        write_text(Path(folder) / "lmforge.json", text)
