"""`lmforge plan --probe-steps N`: lmforge's own training throughput on this machine, for the time to train. N steps
of `Trainer.fit` (the causal-LM objective, AdamW, the plan's micro batch, sequence length, precision and
checkpointing) on the planned model with random weights and random tokens, in one process; the first step (warm-up:
allocation, kernel selection) is left out of the rate."""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

import torch

__all__ = ["RandomTokens", "training_tokens_per_s"]


class RandomTokens:
    """Batches of uniformly random token ids (B, T) with labels shifted by one, from a seeded generator: the data
    source of a throughput probe (what the tokens say does not change the work)."""

    def __init__(self, vocab: int, micro_batch: int, seq_len: int, seed: int = 0):
        self.vocab, self.shape, self.seed, self.k = vocab, (micro_batch, seq_len + 1), seed, 0

    def next_batch(self) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.k)
        self.k += 1
        ids = torch.randint(0, self.vocab, self.shape, generator=g)  # (B, T + 1)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def state_dict(self) -> dict[str, int]:
        return {"k": self.k}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.k = int(state["k"])


def training_tokens_per_s(cfg: Any, micro_batch: int, seq_len: int, precision: str, steps: int,
                          activation_checkpointing: bool = False, device: str = "auto") -> dict[str, float]:
    """{"tokens_per_s": median over steps 2..N, "steps": N, "device": ...} of lmforge's trainer on model config `cfg`
    (a `ModelConfig`); `steps` >= 2."""
    from ..engine.trainer import TrainConfig, Trainer
    from ..models.transformer import Transformer
    from ..objectives.causal_lm import CausalLM

    if steps < 2:
        raise ValueError(f"probe_steps: expected at least 2 (the first one warms up), found {steps}")
    torch.manual_seed(0)
    model = Transformer(cfg)
    train = TrainConfig(steps=steps, micro_batch=micro_batch, precision=precision, log_every=1, eval_every=0,
                        save_every=0, keep_last=1, tensorboard=False, progress_bar=False, resume=False,
                        activation_checkpointing=activation_checkpointing, device=device)
    data = RandomTokens(cfg.vocab_size, micro_batch, seq_len)
    with tempfile.TemporaryDirectory(prefix="lmforge-probe-") as run:
        trainer = Trainer(model, CausalLM(), data, train, run)
        trainer.fit()
    rates = [row["tokens_per_s"] for row in trainer.history if row.get("step", 0) >= 2 and "tokens_per_s" in row]
    return {"tokens_per_s": statistics.median(rates), "steps": steps, "device": str(trainer.world.device)}
