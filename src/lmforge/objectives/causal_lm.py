"""Causal language modelling: L = −Σᵢ log P(xᵢ | x<ᵢ) (next-token cross-entropy), averaged over target tokens."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100


def token_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over labelled tokens and their count; logits (B, T, V), labels (B, T) with -100 = skip."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


class CausalLM:
    """Next-token prediction on `input_ids` with `labels` already shifted (labels[t] = token t + 1)."""

    per_token_nll = True  # its loss is nats per token: evaluation reports perplexity and bits per byte

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
        total, n = out.extra["loss_sum"], out.extra["loss_tokens"]  # chunked: no (B, T, V) logits kept
        loss = total / n.clamp(min=1)
        return loss, {"loss": loss.detach(), "tokens": n}
