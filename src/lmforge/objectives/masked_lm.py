"""Masked language modelling and next-sentence prediction (Devlin et al. 2019, BERT §3.1).

MLM: 15% of non-special tokens are chosen; of those 80% become [MASK], 10% a random token, 10% stay; the loss
is cross-entropy on the chosen positions only. NSP: [CLS] A [SEP] B [SEP] where B follows A in the corpus
(label 0, "IsNext") or is a random segment (label 1, "NotNext"), each with probability 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .causal_lm import IGNORE, token_cross_entropy


@dataclass
class MaskingConfig:
    """Masked-LM corruption and next-sentence pairs."""

    mask_prob: float = 0.15
    """Share of (non-special) tokens chosen for prediction."""
    replace_mask: float = 0.8
    """Of the chosen tokens, the share replaced by [MASK]."""
    replace_random: float = 0.1
    """Of the chosen tokens, the share replaced by a random token (the rest stay unchanged)."""
    nsp: bool = True
    """Build sentence pairs and train next-sentence prediction too."""

    def validate(self) -> None:
        if not 0 < self.mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1), found {self.mask_prob}")
        if self.replace_mask < 0 or self.replace_random < 0 or self.replace_mask + self.replace_random > 1:
            raise ValueError("replace_mask and replace_random must be >= 0 and sum to at most 1")


def mask_tokens(ids: Tensor, special: Tensor, cfg: MaskingConfig, mask_id: int, vocab_size: int,
                gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Corrupt ids (T,) for MLM; `special` (T,) bool marks tokens never chosen. Returns (inputs, labels)."""
    chosen = (torch.rand(ids.shape, generator=gen) < cfg.mask_prob) & ~special
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    u = torch.rand(ids.shape, generator=gen)
    to_mask = chosen & (u < cfg.replace_mask)
    to_random = chosen & (u >= cfg.replace_mask) & (u < cfg.replace_mask + cfg.replace_random)
    inputs = ids.masked_fill(to_mask, mask_id)
    random_ids = torch.randint(vocab_size, ids.shape, generator=gen)
    return torch.where(to_random, random_ids, inputs), labels


class MLMCollate:
    """Turns loader windows into masked (and, with NSP, paired) encoder inputs.

    Randomness comes from a generator seeded by (seed, global sample index), so resume is exact."""

    def __init__(self, cfg: MaskingConfig, cls_id: int, sep_id: int, mask_id: int, vocab_size: int,
                 special_ids: list[int], seed: int = 0):
        self.cfg, self.cls, self.sep, self.mask = cfg, cls_id, sep_id, mask_id
        self.vocab, self.seed = vocab_size, seed
        self.special = torch.tensor(sorted(set(special_ids) | {cls_id, sep_id, mask_id}))

    def __call__(self, windows: list[np.ndarray], ids: list[int], loader) -> dict[str, Tensor]:
        rows, types, labels, nsp = [], [], [], []
        for w, g in zip(windows, ids):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + g)
            toks = torch.from_numpy(w)
            if self.cfg.nsp:
                cut = int(torch.randint(1, len(toks), (1,), generator=gen))
                a, b = toks[:cut], toks[cut:]
                is_random = bool(torch.rand((), generator=gen) < 0.5)
                if is_random:
                    b = torch.from_numpy(loader.random_window(g))[: len(b)]
                seq = torch.cat([torch.tensor([self.cls]), a, torch.tensor([self.sep]), b, torch.tensor([self.sep])])
                tt = torch.cat([torch.zeros(len(a) + 2, dtype=torch.long), torch.ones(len(b) + 1, dtype=torch.long)])
                nsp.append(int(is_random))
            else:
                seq = torch.cat([torch.tensor([self.cls]), toks, torch.tensor([self.sep])])
                tt = torch.zeros(len(seq), dtype=torch.long)
            x, y = mask_tokens(seq, torch.isin(seq, self.special), self.cfg, self.mask, self.vocab, gen)
            rows.append(x)
            types.append(tt)
            labels.append(y)
        batch = {"input_ids": torch.stack(rows), "token_type_ids": torch.stack(types), "labels": torch.stack(labels)}
        if self.cfg.nsp:
            batch["nsp_labels"] = torch.tensor(nsp)
        return batch


class MaskedLM:
    """MLM cross-entropy on chosen tokens, plus NSP cross-entropy when the batch has `nsp_labels`."""

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    token_type_ids=batch.get("token_type_ids"))
        total, n = token_cross_entropy(out.logits, batch["labels"])
        mlm = total / n.clamp(min=1)
        metrics: dict[str, Any] = {"mlm_loss": mlm.detach(), "tokens": n}
        loss = mlm
        if "nsp_labels" in batch and out.nsp_logits is not None:
            nsp = F.cross_entropy(out.nsp_logits.float(), batch["nsp_labels"])
            loss = mlm + nsp
            metrics["nsp_loss"] = nsp.detach()
            metrics["nsp_acc"] = (out.nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean()
        metrics["loss"] = loss.detach()
        return loss, metrics
