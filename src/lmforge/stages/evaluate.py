"""`lmforge evaluate --model M --tasks stdlib-mc,stdlib-ppl,humaneval`: run evaluation tasks and write eval.json
(per-task metrics with standard errors, the exact prompts of the first examples, model and config fingerprints)
and eval.md (a markdown table), printing the table."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class Config:
    model: str
    """Model: a Hugging Face folder, a .gguf file, a hub id, a local alias, or a fine-tuning run's adapter folder."""
    tasks: list[str] = field(default_factory=lambda: ["stdlib-mc", "stdlib-ppl"])
    """Tasks: stdlib-mc, stdlib-ppl, humaneval, mc:PATH (HellaSwag/MMLU/ARC file), ppl:PATH (text files, folders,
    or JSONL/Parquet records with a `text` field)."""
    adapter: str | None = None
    """A LoRA adapter folder (PEFT layout) applied to the model."""
    output: str = "runs/evaluate"
    """Folder for eval.json and eval.md."""
    limit: int | None = None
    """Evaluate at most this many examples (documents, questions, problems) per task."""
    num_fewshot: int = 0
    """Few-shot examples in front of each multiple-choice question (fixed seed)."""
    batch_size: int = 16
    """Sequences per forward pass for log-likelihood tasks."""
    max_length: int | None = None
    """Perplexity window in tokens (default: the model's context length, at most 2048)."""
    stride: int | None = None
    """Perplexity window step (default: max_length, disjoint windows as lm-eval)."""
    samples: int = 1
    """HumanEval: completions per problem (n of pass@k)."""
    k: list[int] = field(default_factory=lambda: [1])
    """HumanEval: the k of pass@k (each <= samples)."""
    temperature: float = 0.0
    """HumanEval: sampling temperature (0 = greedy, one sample)."""
    max_new_tokens: int = 384
    """HumanEval: longest completion."""
    chat: bool = False
    """HumanEval: ask through the chat template (instruct models) instead of plain code completion."""
    seed: int = 1234
    """Seed of few-shot sampling and of HumanEval samples."""
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
        for t in self.tasks:
            parse_task(t)
        if self.samples < 1 or any(k < 1 or k > self.samples for k in self.k):
            raise ValueError(f"k must be within 1..samples ({self.samples}), found {self.k}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, found {self.limit}")


def main(cfg: Config) -> int:
    import torch

    from ..eval.tasks import parse_task
    from ..models.loading import load

    model, tok = load(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, allow_pickle=cfg.allow_pickle)
    if tok is None:
        print(f"error: {cfg.model} has no tokenizer.json; evaluation needs one", file=sys.stderr)
        return 2
    if cfg.adapter:
        from ..transforms.lora import load_adapter

        load_adapter(model, cfg.adapter, allow_pickle=cfg.allow_pickle)
    model.eval()
    results: dict[str, Any] = {}
    for spec in cfg.tasks:
        task = parse_task(spec)
        start = time.perf_counter()
        results[spec] = RUNNERS[task.kind](model, tok, task, cfg)
        results[spec]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{spec}: {_headline(results[spec])} ({results[spec]['seconds']} s)", flush=True)
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


def _multiple_choice(model, tok, task, cfg: Config) -> dict[str, Any]:
    from ..eval.multiple_choice import evaluate_multiple_choice, parse_item, read_multiple_choice
    from ..eval.tasks import stdlib_docstring_items

    if task.path is None:
        items = [parse_item(r, f"stdlib-mc item {i}", "mmlu") for i, r in enumerate(stdlib_docstring_items(cfg.limit))]
    else:
        items = read_multiple_choice(task.path)
    rep = evaluate_multiple_choice(model, tok, items, num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size,
                                   limit=cfg.limit, seed=cfg.seed)
    rep.pop("per_item", None)
    return rep


def _perplexity(model, tok, task, cfg: Config) -> dict[str, Any]:
    import math

    from ..eval.harness import bits_per_byte, rolling_loglikelihood
    from ..eval.tasks import stdlib_heldout_texts, xz_bits_per_byte

    if task.path is None:
        docs = stdlib_heldout_texts(cfg.limit or 20)
    else:
        from ..data.readers import iter_documents

        docs = [(d.source, d.text) for d in iter_documents(task.path)][:cfg.limit]
    if not docs:
        raise ValueError(f"{task.name}: no documents to score")
    max_length = cfg.max_length or min(model.cfg.max_position_embeddings, 2048)
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    total, tokens = 0.0, 0
    for _, text in docs:
        lp, n = rolling_loglikelihood(model, tok.encode(text, add_special_tokens=False), max_length, cfg.stride,
                                      prefix_token_id=prefix, batch_size=max(1, cfg.batch_size // 4))
        total, tokens = total + lp, tokens + n
    n_bytes = sum(len(t.encode("utf-8")) for _, t in docs)
    return {"documents": len(docs), "tokens": tokens, "bytes": n_bytes, "perplexity": math.exp(-total / tokens),
            "bits_per_byte": bits_per_byte(total, n_bytes), "xz_bits_per_byte": xz_bits_per_byte([t for _, t in docs]),
            "max_length": max_length, "stride": cfg.stride or max_length, "examples": [d[0] for d in docs[:3]]}


def _humaneval(model, tok, task, cfg: Config) -> dict[str, Any]:
    from ..eval.humaneval import evaluate_humaneval, load_problems
    from ..inference.engine import Engine

    problems = load_problems()[:cfg.limit]
    rep = evaluate_humaneval(Engine(model, tok), tok, problems, n=cfg.samples, k=cfg.k, temperature=cfg.temperature,
                             max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, chat=cfg.chat)
    rep.pop("per_problem", None)
    return rep


RUNNERS = {"multiple_choice": _multiple_choice, "perplexity": _perplexity, "humaneval": _humaneval}


def _headline(r: dict[str, Any]) -> str:
    if "acc" in r:
        return f"acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}, acc_norm {r['acc_norm']:.4f} (n={r['n']})"
    if "bits_per_byte" in r:
        return (f"bits/byte {r['bits_per_byte']:.4f} (xz -9: {r['xz_bits_per_byte']:.4f}), "
                f"perplexity {r['perplexity']:.3f} over {r['tokens']} tokens")
    return ", ".join(f"pass@{k} {v:.4f} ± {r['stderr'][k]:.4f}" for k, v in r["pass@k"].items()) + \
        f" ({r['problems']} problems, n={r['n']})"


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """One row per task and metric: | task | metric | value | stderr |."""
    rows = ["| task | metric | value | stderr |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        if "acc" in r:
            for m in ("acc", "acc_norm", "acc_norm_token"):
                rows.append(f"| {name} | {m} | {r[m]:.4f} | {r[m + '_stderr']:.4f} |")
        elif "bits_per_byte" in r:
            rows.append(f"| {name} | bits_per_byte | {r['bits_per_byte']:.4f} | |")
            rows.append(f"| {name} | xz -9 bits_per_byte | {r['xz_bits_per_byte']:.4f} | |")
            rows.append(f"| {name} | perplexity | {r['perplexity']:.3f} | |")
        else:
            for k, v in r["pass@k"].items():
                rows.append(f"| {name} | pass@{k} | {v:.4f} | {r['stderr'][k]:.4f} |")
    return "\n".join(rows) + "\n"
