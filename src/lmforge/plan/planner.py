"""One plan: parameters, trainable parameters, FLOPs per token and for a run, Chinchilla sizing, training memory per
device and inference memory, as a JSON-ready dict, and its text table (what `lmforge plan` prints)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from ..models.transformer import ModelConfig
from .counts import count_parameters, trainable_parameters
from .flops import (
    chinchilla_for_flops,
    chinchilla_for_params,
    chinchilla_table,
    flops_per_token,
    run_flops,
    train_seconds,
)
from .memory import TrainSetup, inference_memory, training_memory

__all__ = ["format_chinchilla", "format_law", "format_plan", "human", "law_plan", "make_plan", "read_law"]


def make_plan(cfg: ModelConfig, setup: TrainSetup, *, tokens: float | None = None, flops: float | None = None,
              hours: float | None = None, tokens_per_s: float | None = None, inference_batch: int = 1,
              context: int | None = None, inference_dtype: str = "bf16") -> dict[str, Any]:
    """Every figure of a plan. The run is sized by one of: `tokens`, a FLOP budget `flops`, or `hours` at
    `tokens_per_s`; with none, by Chinchilla's D = 20·N for this model (N = all parameters). The Chinchilla model
    for the budget uses `flops` when given, else C = 6·N·D of this run (Chinchilla's own convention)."""
    given = [k for k, v in (("tokens", tokens), ("flops", flops), ("hours", hours)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"size the run by one of tokens, flops or hours; found {', '.join(given)}")
    if hours is not None and tokens_per_s is None:
        raise ValueError("hours needs tokens_per_s (a measured throughput) to turn time into tokens")
    setup.validate()
    params = count_parameters(cfg)
    train = trainable_parameters(cfg, setup.method, setup.lora_rank, setup.lora_targets,
                                 block_size=setup.quant_block_size, double_quant=setup.double_quant)
    fpt = flops_per_token(cfg, setup.seq_len)
    optimal = chinchilla_for_params(params.total)
    if tokens is not None:
        basis, run_tokens = "tokens", float(tokens)
    elif flops is not None:
        basis, run_tokens = "flops", float(flops) / fpt.total
    elif hours is not None:
        basis, run_tokens = "hours", float(hours) * 3600.0 * float(tokens_per_s)
    else:
        basis, run_tokens = "chinchilla", optimal.tokens
    run: dict[str, Any] = {"basis": basis, "tokens": run_tokens, "flops": run_flops(cfg, run_tokens, setup.seq_len),
                           "flops_6nd": 6.0 * fpt.matmul_params * run_tokens,
                           "tokens_per_param": run_tokens / params.total}
    if tokens_per_s is not None:
        run["tokens_per_s"] = float(tokens_per_s)
        run["hours"] = train_seconds(run_tokens, tokens_per_s) / 3600.0
    budget = chinchilla_for_flops(float(flops) if flops is not None else 6.0 * params.total * run_tokens)
    mem = training_memory(cfg, setup)
    ctx = context or setup.seq_len
    inf = inference_memory(cfg, inference_batch, ctx, inference_dtype)
    return {"config": cfg.to_dict(), "setup": asdict(setup), "parameters": params.to_dict(),
            "trainable": {k: v for k, v in train.to_dict().items() if k != "adapted_layers"}
            | {"adapted_layers": len(train.adapted_layers)},
            "flops_per_token": fpt.to_dict(), "run": run,
            "chinchilla": {"tokens_per_param": 20.0, "for_model": optimal.to_dict(), "for_budget": budget.to_dict()},
            "memory": {"train": mem.to_dict(), "inference": inf.to_dict() | {"dtype": inference_dtype}}}


def human(x: float, unit: str = "") -> str:
    """3 significant figures with a k / M / B (billion) / T / P suffix (bytes: KiB, MiB, GiB, TiB)."""
    if unit == "B":
        for suffix, k in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
            if abs(x) >= k:
                return f"{x / k:.3g} {suffix}"
        return f"{x:.0f} B"
    for suffix, k in (("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= k:
            return f"{x / k:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _rows(title: str, rows: list[tuple[str, str, str]]) -> list[str]:
    width = max(len(r[0]) for r in rows)
    out = [title]
    out += [f"  {name.ljust(width)}  {value:>14}  {note}".rstrip() for name, value, note in rows]
    return out + [""]


def format_plan(p: dict[str, Any], name: str = "") -> str:
    """The plan as a readable text table."""
    pc, tr, f, run = p["parameters"], p["trainable"], p["flops_per_token"], p["run"]
    m, inf, s = p["memory"]["train"], p["memory"]["inference"], p["setup"]
    lines = _rows(f"parameters{f' of {name}' if name else ''}", [
        ("total", f"{pc['total']:,}", "tied LM head" if pc["tied"] else ""),
        ("token embedding", f"{pc['embedding']:,}", "V·C"),
        ("positions / types", f"{pc['positions']:,}", ""),
        ("attention", f"{pc['attention']:,}", "q, k, v, o (+ biases)"),
        ("mlp", f"{pc['mlp']:,}", "gate, up, down (+ biases)"),
        ("norms", f"{pc['norms']:,}", ""),
        ("head", f"{pc['head']:,}", "untied lm_head / MLM / pooler / NSP / classifier"),
        ("non-embedding", f"{pc['non_embedding']:,}", "Kaplan's N"),
        (f"trainable ({tr['method']})", f"{tr['trainable']:,}",
         f"{tr['adapters']:,} adapter weights on {tr['adapted_layers']} layers" if tr["method"] != "full" else ""),
    ] + ([("NF4 weights", f"{tr['nf4_weights']:,}", human(tr["nf4_bytes"], "B"))] if tr["nf4_weights"] else []))
    lines += _rows(f"FLOPs per token (forward + backward, T = {f['seq_len']})", [
        ("6N", human(f["dense"]), f"N = {f['matmul_params']:,} matmul weights"),
        ("attention", human(f["attention"]), "12·L·(H·D)·T, no causal discount"),
        ("per-sequence heads", human(f["per_sequence"]), ""),
        ("total", human(f["total"]), ""),
    ])
    run_rows = [("tokens D", human(run["tokens"]), f"sized by {run['basis']}; {run['tokens_per_param']:.3g} per param"),
                ("FLOPs C", f"{run['flops']:.3g}", f"6ND alone: {run['flops_6nd']:.3g}")]
    if "hours" in run:
        run_rows.append(("time", f"{run['hours']:.3g} h", f"at {human(run['tokens_per_s'])} tokens/s"))
    ch = p["chinchilla"]
    run_rows += [("Chinchilla D for N", human(ch["for_model"]["tokens"]), f"20·N, C = {ch['for_model']['flops']:.3g}"),
                 ("Chinchilla N for C", human(ch["for_budget"]["params"]),
                  (f"D = {human(ch['for_budget']['tokens'])} for C = {ch['for_budget']['flops']:.3g} (--flops, "
                   f"else 6·N·D of this run)"))]
    lines += _rows("run", run_rows)
    par = s["parallel"] + (f" × {s['devices']}" if s["parallel"] != "single" else "") + (
        f", tp {s['tp']}" if s.get("tp", 1) > 1 else "")
    lines += _rows(f"training memory per device ({par}, {s['method']}, {s['precision']}, B = {s['micro_batch']}, "
                   f"T = {s['seq_len']}, checkpointing {'on' if s['activation_checkpointing'] else 'off'})", [
        ("weights", human(m["weights"], "B"), "fp32 trainable; frozen in the autocast dtype; NF4"),
        ("gradients", human(m["gradients"], "B"), "fp32"),
        ("optimizer", human(m["optimizer"], "B"), f"{s['optimizer_states']} fp32 states per trainable parameter"),
        ("master weights", human(m["master_weights"], "B"), "the fp32 parameters are the master copy"),
        ("autocast copies", human(m["autocast_copies"], "B"), "low-precision weight casts saved for backward"),
        ("DDP buckets", human(m["ddp_buckets"], "B"), ""),
        ("FSDP gathered", human(m["fsdp_gathered"], "B"), "root + blocks in flight, unsharded"),
        ("activations", human(m["activations"], "B"), "saved for backward"),
        ("recompute", human(m["recompute"], "B"), "one block, with checkpointing"),
        ("loss / logits", human(m["loss_head"], "B"), "chunked cross-entropy"),
        ("head gradient", human(m["head_grad"], "B"), "second copy as backward starts"),
        ("optimizer step", human(m["optimizer_step"], "B"), "temporaries of the step (CPU AdamW)"),
        ("peak (estimate)", human(m["peak"], "B"), "persistent + max(forward end, backward end, step)"),
        ("sum of terms", human(m["total"], "B"), "upper bound"),
    ])
    lines += _rows(f"inference memory ({inf['dtype']}, batch {inf['batch']}, context {inf['context']})", [
        ("weights", human(inf["weights"], "B"), ""),
        ("KV cache", human(inf["kv_cache"], "B"), "2·L·K·D·batch·context"),
        ("total", human(inf["total"], "B"), ""),
    ])
    return "\n".join(lines).rstrip() + "\n"


def format_chinchilla(rows: list | None = None) -> str:
    """Chinchilla's compute-optimal table (D = 20·N, C = 6·N·D) for Hoffmann et al. 2022's model sizes."""
    rows = rows if rows is not None else chinchilla_table()
    lines = ["Chinchilla compute-optimal (D = 20·N, C = 6·N·D)", f"  {'parameters':>10}  {'tokens':>10}  {'FLOPs':>9}"]
    lines += [f"  {human(r.params):>10}  {human(r.tokens):>10}  {r.flops:9.3g}" for r in rows]
    return "\n".join(lines) + "\n"


def read_law(path: str) -> tuple[Any, str]:
    """(LawFit, which N it counts: "non_embedding" or "total") from a scale.json written by `lmforge scale` (or any
    JSON with a "fit" entry of E, A, B, alpha, beta); InputError naming the file otherwise."""
    import json
    from pathlib import Path

    from ..errors import InputError
    from .fit import law_from_dict

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return law_from_dict(data.get("fit", data)), str(data.get("params", "non_embedding"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"law: {path}: not a fitted law ({e}); expected the scale.json of `lmforge scale`") from None


def law_plan(fit: Any, params: str, flops: float, model: tuple[float, float] | None = None) -> dict[str, Any]:
    """The fitted law's compute-optimal N, D and loss for a FLOP budget (C = 6·N·D, Hoffmann et al. 2022 eq. 4), and
    with `model` = (N, D) of a planned run (N counted as the law counts it) the loss the law predicts for it."""
    from .fit import compute_optimal, interval, predict

    out: dict[str, Any] = {"params": params, "law": {k: getattr(fit, k) for k in ("E", "A", "B", "alpha", "beta")},
                           "compute_optimal": compute_optimal(fit, flops).to_dict()}
    if model is not None:
        out["run"] = {"N": model[0], "D": model[1], "loss": predict(fit, *model), "interval": interval(fit, *model)}
    return out


def format_law(p: dict[str, Any]) -> str:
    """A law plan (`law_plan`) as text."""
    law, opt = p["law"], p["compute_optimal"]
    e = f"{law['E']:.3g}" if law["E"] >= 1e-9 else "0"  # an E the fit pinned at its bound (1e-40) reads as 0
    rows = [("law", f"L = {e} + {law['A']:.3g}/N^{law['alpha']:.3f} + {law['B']:.3g}/D^{law['beta']:.3f}",
             f"N = {p['params'].replace('_', '-')} parameters"),
            ("N_opt", human(opt["params"]), f"for C = {opt['flops']:.3g} (6·N·D)"),
            ("D_opt", human(opt["tokens"]), f"{opt['tokens'] / opt['params']:.3g} tokens per parameter"),
            ("loss at optimum", f"{opt['loss']:.4g}", "")]
    if "run" in p:
        lo, hi = p["run"]["interval"]
        rows.append(("loss of this run", f"{p['run']['loss']:.4g}", f"N = {human(p['run']['N'])}, D = "
                     f"{human(p['run']['D'])}" + (f"; 95% [{lo:.4g}, {hi:.4g}]" if not math.isnan(lo) else "")))
    return "\n".join(_rows("fitted scaling law", rows)).rstrip() + "\n"
