"""Sequence classification and regression on a pooled summary (Devlin et al. 2019, BERT §4.1).

Classify: L = −(1/B) Σᵢ log softmax(W hᵢ)[yᵢ], cross-entropy of the classifier logits (B, K) against label ids.
Regress: L = (1/B) Σᵢ (W hᵢ − yᵢ)², mean squared error of the scalar head (num_labels = 1), e.g. STS-B.
hᵢ is the pooled sequence summary (the BERT pooler on [CLS] for encoders, the last real token for decoders).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Classification:
    """Cross-entropy (classify) or MSE (regress) on the classifier head; metric weight `tokens` = examples."""

    def __init__(self, task: Literal["classify", "regress"] = "classify", num_labels: int = 2):
        if task not in ("classify", "regress"):
            raise ValueError(f"task must be 'classify' or 'regress', found {task!r}")
        if task == "classify" and num_labels < 2:
            raise ValueError(f"classify needs num_labels >= 2, found {num_labels} (use task=regress for 1 output)")
        if task == "regress" and num_labels != 1:
            raise ValueError(f"regress needs num_labels == 1 (a scalar head), found {num_labels}")
        self.task, self.num_labels = task, num_labels

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Classifier outputs (B, num_labels) in fp32."""
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    token_type_ids=batch.get("token_type_ids"))
        logits = out.logits
        if logits is None or logits.dim() != 2 or logits.shape[-1] != self.num_labels:
            found = None if logits is None else tuple(logits.shape)
            raise ValueError(f"the model gives logits {found}, expected (batch, {self.num_labels}): load it with "
                             f"head='classifier', num_labels={self.num_labels}")
        return logits.float()

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        logits = self.logits(model, batch)  # (B, K)
        labels = batch["labels"]  # (B,)
        metrics: dict[str, Any] = {"tokens": labels.shape[0]}
        if self.task == "classify":
            loss = F.cross_entropy(logits, labels)
            metrics["accuracy"] = (logits.argmax(-1) == labels).float().mean()
        else:
            pred = logits.squeeze(-1)  # (B,)
            loss = F.mse_loss(pred, labels.float())
            metrics["mae"] = (pred - labels).abs().mean().detach()
        metrics["loss"] = loss.detach()
        return loss, metrics

    @torch.no_grad()
    def predict(self, model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """(predictions, targets) over `batches` in eval mode: class ids (long) or scalar predictions (float)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        preds, targets = [], []
        try:
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = self.logits(model, batch)  # (B, K)
                preds.append(logits.argmax(-1) if self.task == "classify" else logits.squeeze(-1))
                targets.append(batch["labels"])
        finally:
            model.train(was_training)
        if not preds:
            raise ValueError("predict: no batches")
        return torch.cat(preds).cpu(), torch.cat(targets).cpu()
