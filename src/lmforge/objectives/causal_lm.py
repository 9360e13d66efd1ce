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
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    position_ids=batch.get("position_ids"), labels=batch["labels"])
        total, n = out.extra["loss_sum"], out.extra["loss_tokens"]  # chunked: no (B, T, V) logits kept
        loss = total / n.clamp(min=1)
        return loss, {"loss": loss.detach(), "tokens": n}


class WithReplay:
    """Replay against forgetting: L = L_task + w · L_pretrain, where L_pretrain is the next-token loss on the
    pretraining sequences a `ReplayMix` batch carries (`replay_input_ids`, `replay_labels`). Batches without them
    (evaluation) get the task objective alone."""

    def __init__(self, task: Any, weight: float = 1.0):
        self.task, self.weight = task, weight
        self.per_token_nll = getattr(task, "per_token_nll", False)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        if "replay_input_ids" not in batch:
            return self.task(model, batch)
        task_batch = {k: v for k, v in batch.items() if not k.startswith("replay_")}
        loss, metrics = self.task(model, task_batch)
        out = model(batch["replay_input_ids"], labels=batch["replay_labels"])
        replay = out.extra["loss_sum"] / out.extra["loss_tokens"].clamp(min=1)
        metrics = dict(metrics, task_loss=metrics["loss"], replay_loss=replay.detach())
        total = loss + self.weight * replay
        metrics["loss"] = total.detach()
        return total, metrics
