"""`lmforge plan --model PRESET|CONFIG|PATH [--tokens N | --flops C | --hours H --tokens-per-s R]
[--parallel single|ddp|zero1|zero2|fsdp] [--devices P] [--tp N] [--method full|lora|qlora]
[--micro-batch B --seq-len T]`:
exact parameter counts, FLOPs per token and for a run, Chinchilla sizing, training memory per device and inference
memory, printed as a table and written as JSON; `--law RUN/scale.json` adds a fitted law's compute-optimal N, D.
Reads a model's config only (a preset builds no weights, a folder reads config.json, a .gguf its metadata).
`--chinchilla` prints Chinchilla's compute-optimal table. See docs/scaling.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

POSITIONAL = ("model",)


@dataclass
class Config:
    model: str = ""
    """A preset (llama-7m, smollm2-135m, ...), a config file (our fields or a Hugging Face config.json, JSON or
    YAML), a model folder or .gguf file, or a local alias (smollm2-135m-instruct); empty with --chinchilla."""
    tokens: float | None = None
    """Training tokens D of the run (one of tokens, flops, hours; none: Chinchilla's 20 per parameter)."""
    flops: float | None = None
    """FLOP budget C of the run: D = C / FLOPs per token."""
    hours: float | None = None
    """Wall-clock budget of the run, with tokens_per_s: D = hours × 3600 × tokens_per_s."""
    tokens_per_s: float | None = None
    """Measured training throughput (all devices), for the time to train."""
    probe_steps: int = 0
    """Measure tokens_per_s here first: N steps of lmforge's trainer on the model (random weights and tokens, one
    process, this plan's batch, length and precision); times the devices (ideal scaling) for the run. 0 = off."""
    parallel: Literal["single", "ddp", "zero1", "zero2", "fsdp"] = "single"
    """One process, DDP, ZeRO-1, ZeRO-2 or FSDP2 (ZeRO-3) over the devices / tp data-parallel processes."""
    devices: int = 1
    """P: devices (processes) the run uses."""
    tp: int = 1
    """Tensor-parallel degree (train.parallel.tp): block linears, heads and MLP width split over tp devices."""
    sequence_parallel: bool = False
    """With tp: norms and the residual stream split by position too (train.parallel.sequence)."""
    method: Literal["full", "lora", "qlora"] = "full"
    """Full training, LoRA on a frozen base, or QLoRA (NF4 base)."""
    micro_batch: int = 8
    """B: sequences per micro batch on each device."""
    seq_len: int | None = None
    """T: tokens per sequence (default: the model's context, at most 2048)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Autocast dtype of training (parameters stay fp32)."""
    activation_checkpointing: bool = False
    """Plan with activation checkpointing (block inputs kept, one block recomputed at a time)."""
    optimizer_states: int = 2
    """fp32 states per trainable parameter: 2 (AdamW), 1 (momentum), 0 (SGD)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    """Linear layers with adapters (last name component or an fnmatch pattern of the full name)."""
    device: Literal["cpu", "cuda"] = "cuda"
    """Device kind (the loss chunk and CPU's attention path depend on it)."""
    inference_batch: int = 1
    """Sequences served at once, for the KV cache."""
    context: int | None = None
    """Tokens per served sequence (default: seq_len)."""
    inference_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """dtype of served weights and KV cache."""
    law: str | None = None
    """A fitted scaling law (RUN/scale.json of `lmforge scale`): its compute-optimal N, D and loss for --flops (else
    for 6·N·D of the planned run), and the loss it predicts for the planned model."""
    chinchilla: bool = False
    """Also print Chinchilla's compute-optimal table (D = 20·N, C = 6·N·D) for Hoffmann et al.'s sizes."""
    output: str = "runs/plan.json"
    """Where to write the plan as JSON (empty: do not write)."""

    def validate(self) -> None:
        if not self.model and not self.chinchilla and not self.law:
            raise ValueError("model: expected a preset, config file, model folder or .gguf (or --chinchilla, --law)")
        if self.law and not self.model and self.flops is None:
            raise ValueError("law: needs a FLOP budget (--flops C) or a model to plan a run for")
        for name in ("tokens", "flops", "hours", "tokens_per_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}: expected a positive number, found {value}")
        given = [n for n in ("tokens", "flops", "hours") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"size the run by one of tokens, flops or hours; found {', '.join(given)}")
        if self.probe_steps and (self.probe_steps < 2 or self.tokens_per_s is not None):
            raise ValueError(f"probe_steps: expected 0 or >= 2 and no tokens_per_s beside it, found {self.probe_steps}"
                             f" with tokens_per_s {self.tokens_per_s}")
        if self.hours is not None and self.tokens_per_s is None and not self.probe_steps:
            raise ValueError("hours: needs tokens_per_s (a measured throughput) to turn time into tokens")
        if self.parallel == "single" and self.devices != 1:
            raise ValueError(f"devices: {self.devices} needs parallel ddp, zero1, zero2 or fsdp (single uses 1)")
        for name in ("devices", "tp", "micro_batch", "lora_rank", "inference_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, found {getattr(self, name)}")
        for name in ("seq_len", "context"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, found {getattr(self, name)}")
        from ..plan.memory import TrainSetup

        TrainSetup(parallel=self.parallel, devices=self.devices, tp=self.tp, method=self.method,
                   sequence_parallel=self.sequence_parallel).validate()


def main(cfg: Config) -> int:
    from ..atomic import write_text
    from ..plan.flops import chinchilla_table
    from ..plan.memory import TrainSetup
    from ..plan.planner import format_chinchilla, format_plan, make_plan
    from ..plan.source import model_config

    out: dict = {}
    if cfg.chinchilla:
        rows = chinchilla_table()
        print(format_chinchilla(rows))
        out["chinchilla_table"] = [r.to_dict() for r in rows]
    if cfg.model:
        mc = model_config(cfg.model)
        seq = cfg.seq_len or min(mc.max_position_embeddings, 2048)
        setup = TrainSetup(micro_batch=cfg.micro_batch, seq_len=seq, parallel=cfg.parallel, devices=cfg.devices,
                           tp=cfg.tp, sequence_parallel=cfg.sequence_parallel, method=cfg.method,
                           precision=cfg.precision,
                           activation_checkpointing=cfg.activation_checkpointing,
                           optimizer_states=cfg.optimizer_states, lora_rank=cfg.lora_rank,
                           lora_targets=list(cfg.lora_targets), device=cfg.device)
        rate = cfg.tokens_per_s
        if cfg.probe_steps:
            from ._probe import training_tokens_per_s

            probe = training_tokens_per_s(mc, cfg.micro_batch, seq, cfg.precision, cfg.probe_steps,
                                          cfg.activation_checkpointing)
            rate = probe["tokens_per_s"] * cfg.devices
            print(f"probe: {probe['tokens_per_s']:,.0f} tokens/s on one {probe['device']} process "
                  f"({cfg.probe_steps} steps of lmforge's trainer)" + (f"; × {cfg.devices} devices" if cfg.devices > 1
                                                                         else ""))
            out["probe"] = probe
        plan = make_plan(mc, setup, tokens=cfg.tokens, flops=cfg.flops, hours=cfg.hours,
                         tokens_per_s=rate, inference_batch=cfg.inference_batch, context=cfg.context,
                         inference_dtype=cfg.inference_dtype)
        print(format_plan(plan, cfg.model))
        out = {"model": cfg.model, **plan, **out}
    if cfg.law:
        from ..plan.planner import format_law, law_plan, read_law

        fit, which = read_law(cfg.law)
        run = None
        if cfg.model:
            run = (float(out["parameters"]["total" if which == "total" else "non_embedding"]), out["run"]["tokens"])
        budget = cfg.flops if cfg.flops is not None else 6.0 * run[0] * run[1]
        out["law"] = {"path": cfg.law, **law_plan(fit, which, budget, run)}
        print(format_law(out["law"]))
    if cfg.output:
        path = write_text(cfg.output, json.dumps(out, indent=2) + "\n")
        print(f"plan: {path}")
    return 0
