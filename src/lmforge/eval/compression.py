"""What every compress command (quantize, prune, distill, export) measures before and after: size on disk, held-out
bits per byte, a task metric, and greedy decode speed on this machine; written as `compress.json`."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text

__all__ = ["CompressEval", "measure", "load_measured", "disk_size", "write_report", "compare_table", "report_saved"]

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".onnx_data", ".data", ".bin", ".pt")


@dataclass
class CompressEval:
    """The before / after measurements of a compress command."""

    enabled: bool = True
    """Measure at all (false: only compress and report sizes)."""
    tasks: list[str] = field(default_factory=lambda: ["stdlib-ppl", "stdlib-mc"])
    """Evaluation tasks (as `lmforge evaluate --tasks`): bits per byte of held-out text and a task metric."""
    limit: int | None = 200
    """Examples per task (held-out documents for a perplexity task, questions for multiple choice)."""
    decode_tokens: int = 64
    """Greedy tokens generated to time decoding (0: skip)."""
    prompt: str = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    """The prompt decoding is timed on."""
    repeats: int = 2
    """Decode timings; the best is reported."""

    def validate(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval.limit must be >= 1 or null, found {self.limit}")
        if self.decode_tokens < 0 or self.repeats < 1:
            raise ValueError(f"eval.decode_tokens must be >= 0 and eval.repeats >= 1, found {self.decode_tokens}, "
                             f"{self.repeats}")


def disk_size(path: str | Path) -> int:
    """Bytes of a model's weights: a file, or the weight files of a folder (not its tokenizer or configs)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def decode_speed(model, tok, cfg: CompressEval) -> float | None:
    """Greedy tokens per second of lmforge's engine after `cfg.prompt` (best of `cfg.repeats`, one warm-up)."""
    from ..inference.engine import Engine
    from ..inference.sampling import SamplingParams

    if cfg.decode_tokens == 0 or model.cfg.head != "lm":
        return None
    engine = Engine(model, tok)
    ids = tok.encode(cfg.prompt, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=cfg.decode_tokens, ignore_eos=True)
    engine.generate([ids], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
    best = None
    for _ in range(cfg.repeats):
        t = time.perf_counter()
        (out,) = engine.generate([ids], params)
        rate = len(out.token_ids) / (time.perf_counter() - t)
        best = rate if best is None else max(best, rate)
    return best


def measure(model, tok, cfg: CompressEval, path: str | Path | None = None) -> dict[str, Any]:
    """Size of `path` (when given), each task's report and headline metric, and decode tokens/s."""
    from .runners import TaskOptions, headline_metrics, run_task

    out: dict[str, Any] = {}
    if path is not None:
        out["size_bytes"] = disk_size(path)
    if not cfg.enabled:
        return out
    opts = TaskOptions(limit=cfg.limit)
    model.eval()
    with torch.no_grad():
        for spec in cfg.tasks:
            t = time.perf_counter()
            report, _ = run_task(model, tok, spec, opts)
            extra = {k: report[k] for k in ("acc_stderr", "n", "documents", "tokens") if k in report}
            out[spec] = {**headline_metrics(report), **extra, "seconds": round(time.perf_counter() - t, 2)}
    out["decode_tokens_per_s"] = decode_speed(model, tok, cfg)
    return out


def load_measured(source: str, dtype: torch.dtype, cfg: CompressEval, command: str) -> tuple[Any, Any, dict]:
    """(model, tokenizer, before) for a compress command: `source` loaded in `dtype` and measured (`measure`, its
    size on disk when it is a local path, and its size in float32, parameters × 4 bytes, the reference of size
    ratios). ValueError when it has no tokenizer (calibration and evaluation need one)."""
    from ..models.loading import resolve
    from ..transforms.peft import load

    model, tok = load(source, dtype=dtype)
    if tok is None:
        raise ValueError(f"{source} has no tokenizer; {command} needs one to calibrate and evaluate")
    print(f"measuring {source} before {command}", flush=True)
    before = {**measure(model, tok, cfg), "float32_bytes": 4 * model.num_parameters()}
    try:
        before["size_bytes"] = disk_size(resolve(source))
    except (OSError, ValueError):
        before["size_bytes"] = None
    return model, tok, before


def report_saved(output: str | Path, command: str, config: Any, before: dict[str, Any], tok, cfg: CompressEval,
                 dtype: torch.dtype, extra: dict[str, Any] | None = None,
                 check: Any = None) -> tuple[Path, dict[str, Any]]:
    """Reload what a compress command saved at `output` (as a user would), measure it, write compress.json with
    `before` and print the before / after table; `check(reloaded_model)` may verify the reload first (e.g. the
    same zeros). Returns (compress.json path, after)."""
    from ..transforms.peft import load

    reloaded, _ = load(output, dtype=dtype)
    if check is not None:
        check(reloaded)
    after = measure(reloaded, tok, cfg, output)
    report = write_report(output, command, config, before, after, extra)
    print(compare_table(before, after))
    print(f"wrote {report}")
    return report, after


def write_report(folder: str | Path, command: str, config: Any, before: dict[str, Any], after: dict[str, Any],
                 extra: dict[str, Any] | None = None) -> Path:
    """compress.json: what was done, before, after and the after / before ratio of every shared number."""
    ratios: dict[str, float] = {}

    def walk(b: Any, a: Any, key: str) -> None:
        if isinstance(b, dict) and isinstance(a, dict):
            for k in b.keys() & a.keys():
                walk(b[k], a[k], f"{key}.{k}" if key else k)
        elif isinstance(b, (int, float)) and isinstance(a, (int, float)) and b:
            ratios[key] = a / b

    walk(before, after, "")
    report = {"command": command, "config": asdict(config) if hasattr(config, "__dataclass_fields__") else config,
              "before": before, "after": after, "after_over_before": dict(sorted(ratios.items())), **(extra or {})}
    path = Path(folder) / "compress.json" if Path(folder).is_dir() else Path(folder).with_suffix(".compress.json")
    write_text(path, json.dumps(report, indent=2, default=str) + "\n")
    return path


def compare_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Before / after as aligned text: size, each task's first metric, decode tokens/s."""
    def mb(n: int | None) -> str:
        return "-" if n is None else f"{n / 1e6:.1f}"

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    rows = [("size on disk (MB)", mb(before.get("size_bytes")), mb(after.get("size_bytes")))]
    for task, b in before.items():
        if isinstance(b, dict) and isinstance(after.get(task), dict):
            metric = next(iter(b))
            rows.append((f"{task} {metric}", f"{b[metric]:.4f}", f"{after[task][metric]:.4f}"))
    rows.append(("decode tokens/s", num(before.get("decode_tokens_per_s")), num(after.get("decode_tokens_per_s"))))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {b:>10}  {a:>10}" for name, b, a in [("", "before", "after"), *rows])
