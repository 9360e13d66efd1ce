"""`lmforge evaluate --model M --tasks stdlib-mc,stdlib-ppl,stdlib-doctest,humaneval`: run evaluation tasks and
write eval.json (per-task metrics with standard errors, the exact prompts of the first examples, model and config
fingerprints, optionally the share of each task's examples found in a training corpus) and eval.md (a markdown
table), printing the table. The tasks themselves live in eval/runners.py, shared with training."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..eval.runners import TaskOptions


@dataclass(kw_only=True)
class Config(TaskOptions):
    model: str
    """Model: a Hugging Face folder, a .gguf file, a hub id, a local alias, or a fine-tuning run's adapter folder."""
    tasks: list[str] = field(default_factory=lambda: ["stdlib-mc", "stdlib-ppl"])
    """Tasks: stdlib-mc, stdlib-ppl, stdlib-doctest, humaneval, mc:PATH (HellaSwag/MMLU/ARC file), ppl:PATH (text
    files, folders, or JSONL/Parquet records with a `text` field), gen:PATH (GSM8K or prompt/target records),
    cls:PATH (text/label records, classifier models), judge:PATH (prompts; needs judge and baseline)."""
    adapter: str | None = None
    """A LoRA adapter folder (PEFT layout) applied to the model."""
    output: str = "runs/evaluate"
    """Folder for eval.json and eval.md."""
    contamination: str | None = None
    """A training corpus (text/JSONL/Parquet files or folders, or a token-shard folder): report per task the share
    of examples that share a 13-gram with it."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the model."""
    device: str = "cpu"
    """Device to run on (cpu, cuda, ...)."""
    allow_pickle: bool = False
    """Allow loading pickle (.bin/.pt) checkpoints; only for files you trust."""

    def validate(self) -> None:
        from ..eval.tasks import parse_task

        if not self.tasks:
            raise ValueError("tasks: give at least one task")
        kinds = {parse_task(t).kind for t in self.tasks}
        if "judge" in kinds and not (self.judge and self.baseline):
            raise ValueError(f"judge:PATH tasks need judge (a model or an endpoint URL) and baseline (a model), "
                             f"found judge={self.judge!r}, baseline={self.baseline!r}")
        super().validate()


def main(cfg: Config) -> int:
    import torch

    from ..eval.runners import headline, markdown, run_task
    from ..transforms.peft import load

    model, tok = load(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, allow_pickle=cfg.allow_pickle)
    if tok is None:
        print(f"error: {cfg.model} has no tokenizer.json; evaluation needs one", file=sys.stderr)
        return 2
    if cfg.adapter:
        from ..transforms.peft import load_adapter

        load_adapter(model, cfg.adapter, allow_pickle=cfg.allow_pickle)
    model.eval()
    results: dict[str, Any] = {}
    texts: dict[str, list[str]] = {}
    for spec in cfg.tasks:
        start = time.perf_counter()
        results[spec], texts[spec] = run_task(model, tok, spec, cfg)
        results[spec]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{spec}: {headline(results[spec])} ({results[spec]['seconds']} s)", flush=True)
    if cfg.contamination:
        from ..eval.contamination import contamination

        found = contamination(texts, cfg.contamination)  # shards: their own tokenizer, from the index
        for spec in cfg.tasks:
            results[spec]["contamination"] = found["tasks"][spec]
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    report = {"model": cfg.model, "adapter": cfg.adapter, "model_config_sha256": fingerprint[:16],
              "tokenizer": tok.fingerprint(), "config": asdict(cfg), "tasks": results}
    (out / "eval.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    table = markdown(results)
    (out / "eval.md").write_text(table)
    print(table)
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0
