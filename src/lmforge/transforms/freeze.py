"""Freeze all but the top N blocks (and the output head): full fine-tuning's cheap cousin for small datasets."""

from __future__ import annotations

from torch import nn

HEAD_MODULES = ("lm_head", "score", "pooler", "mlm", "nsp", "qa_outputs")
"""Output-head modules of `Transformer` (trained with the top blocks)."""


def train_top_blocks(model: nn.Module, n: int) -> nn.Module:
    """Train only the last `n` blocks, the final norm and the head; freeze everything else (the embeddings too,
    so with tied embeddings the LM output projection stays frozen)."""
    if not 0 <= n <= len(model.blocks):
        raise ValueError(f"freeze.train_top must be between 0 and {len(model.blocks)} (the model's blocks), found {n}")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(model.blocks[len(model.blocks) - n:])
    trainable += [getattr(model, name) for name in ("norm",) + HEAD_MODULES if hasattr(model, name)]
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("freeze.train_top 0 leaves nothing to train on a model without a separate head")
    return model
