"""Extractive question answering: predict where the answer starts and ends in the context (Devlin et al. 2019,
BERT §4.2, on SQuAD; Rajpurkar et al. 2016).

`decode_answers` turns the logits of a context's windows back into one answer, a span of the context (n-best
start x end tokens, as transformers' QA post-processing; the SQuAD v2.0 no-answer threshold).

The span head gives two logits per token, s_t and e_t. With gold start and end tokens (a, b) of a window — both the
"no answer" position (CLS) when the answer is not inside it or the question has none (SQuAD v2.0) —
L = ½ (−log softmax(s)[a] − log softmax(e)[b]), averaged over the windows of a batch. Padded positions are left
out of both softmaxes, so a window's loss does not depend on what it is batched with (transformers' QA models
include them).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..data.qa import QAData, QAExample, QAFeature

_CHUNK = 512  # windows decoded per batched step: bounds the (chunk, k, k) score tensor

__all__ = ["SpanExtraction", "span_logits", "decode_answers", "answer_questions"]


class SpanExtraction:
    """The span loss on a model with head "span"; metrics: loss and start / end token accuracy (weight: windows)."""

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(start, end) logits (B, T) in fp32, padded positions at the dtype's minimum."""
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    token_type_ids=batch.get("token_type_ids"))
        z = out.logits
        if z is None or z.dim() != 3 or z.shape[-1] != 2:
            found = None if z is None else tuple(z.shape)
            raise ValueError(f"the model gives logits {found}, expected (batch, tokens, 2): load it with head='span'")
        z = z.float()  # (B, T, 2)
        if batch.get("attention_mask") is not None:
            z = z.masked_fill(batch["attention_mask"][..., None] == 0, torch.finfo(z.dtype).min)
        return z[..., 0], z[..., 1]

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        start, end = self.logits(model, batch)  # (B, T) each
        a, b = batch["start_positions"], batch["end_positions"]  # (B,)
        loss = (F.cross_entropy(start, a) + F.cross_entropy(end, b)) / 2
        metrics: dict[str, Any] = {"tokens": a.shape[0], "loss": loss.detach(),
                                   "start_accuracy": (start.argmax(-1) == a).float().mean(),
                                   "end_accuracy": (end.argmax(-1) == b).float().mean()}
        return loss, metrics


@torch.no_grad()
def span_logits(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """(start, end) logits of every window of `batches` in order, in eval mode: one 1-D fp32 tensor (T_i,) per
    window, cut to its real tokens — what `decode_answers` reads."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    starts: list[Tensor] = []
    ends: list[Tensor] = []
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            s, e = SpanExtraction().logits(model, batch)  # (B, T) each
            lengths = batch["attention_mask"].sum(-1).tolist() if "attention_mask" in batch else [s.shape[1]] * len(s)
            for i, n in enumerate(lengths):
                starts.append(s[i, :n].cpu())
                ends.append(e[i, :n].cpu())
    finally:
        model.train(was_training)
    return starts, ends


def _row(logits: Tensor, length: int, index: int, name: str) -> Tensor:
    """One feature's logits as float64 on the CPU, cut to its unpadded length (a padded row is accepted)."""
    row = torch.as_tensor(logits).detach()
    if row.dim() != 1 or row.shape[0] < length:
        raise ValueError(f"{name}[{index}]: expected a 1-D tensor of at least {length} logits (the feature's tokens), "
                         f"found shape {tuple(row.shape)}")
    row = row[:length].to("cpu", torch.float64)  # (T_i,)
    if torch.isnan(row).any():
        raise ValueError(f"{name}[{index}]: the logits contain NaN; expected finite numbers from the model")
    return row


def _feature_spans(features: Sequence[Any], start_logits: Sequence[Tensor], end_logits: Sequence[Tensor],
                   n_best: int, max_answer_length: int) -> tuple[list[list[tuple[float, int, int]]], list[float]]:
    """Per feature: up to n_best valid spans (score, start token, end token), best first, picked from the top
    n_best start x top n_best end tokens; and the feature's null score start[cls] + end[cls]."""
    spans: list[list[tuple[float, int, int]]] = []
    nulls: list[float] = []
    for lo in range(0, len(features), _CHUNK):
        chunk = range(lo, min(len(features), lo + _CHUNK))
        width = max(1, max(len(features[i].offsets) for i in chunk))
        s_all = torch.full((len(chunk), width), -math.inf, dtype=torch.float64)  # (n, T) padded with -inf
        e_all = torch.full((len(chunk), width), -math.inf, dtype=torch.float64)  # (n, T)
        in_context = torch.zeros((len(chunk), width), dtype=torch.bool)  # (n, T) token may be part of an answer
        for r, i in enumerate(chunk):
            feature = features[i]
            t = len(feature.offsets)
            s, e = _row(start_logits[i], t, i, "start_logits"), _row(end_logits[i], t, i, "end_logits")
            if not 0 <= feature.cls_index < t:
                raise ValueError(f"features[{i}]: cls_index {feature.cls_index} is outside its {t} tokens")
            s_all[r, :t], e_all[r, :t] = s, e
            in_context[r, :t] = torch.tensor([o is not None for o in feature.offsets], dtype=torch.bool)
            nulls.append(float(s[feature.cls_index] + e[feature.cls_index]))
        k = min(n_best, width)
        si = s_all.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (n, k) top start tokens
        ei = e_all.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (n, k) top end tokens
        score = s_all.gather(1, si)[:, :, None] + e_all.gather(1, ei)[:, None, :]  # (n, k start, k end)
        length = ei[:, None, :] - si[:, :, None] + 1  # (n, k, k) tokens in the span
        ok = (in_context.gather(1, si)[:, :, None] & in_context.gather(1, ei)[:, None, :]
              & (length >= 1) & (length <= max_answer_length) & torch.isfinite(score))  # (n, k, k)
        flat = score.masked_fill(~ok, -math.inf).flatten(1)  # (n, k*k)
        m = min(n_best, k * k)
        order = flat.sort(dim=1, descending=True, stable=True).indices[:, :m]  # (n, m) best pairs first
        keep = ok.flatten(1).gather(1, order).tolist()
        rows = zip(flat.gather(1, order).tolist(), si.gather(1, order // k).tolist(),
                   ei.gather(1, order % k).tolist(), keep)
        for scores, starts, ends, oks in rows:
            spans.append([(sc, a, b) for sc, a, b, good in zip(scores, starts, ends, oks) if good])
    return spans, nulls


def decode_answers(examples: Sequence[QAExample], features: Sequence[QAFeature],
                   start_logits: Sequence[Tensor] | Tensor, end_logits: Sequence[Tensor] | Tensor, *,
                   n_best: int = 20, max_answer_length: int = 30,
                   null_threshold: float | None = None) -> list[dict[str, Any]]:
    """One answer per example, in example order, from its windows' logits (as HF run_qa's post-processing): the
    top n_best start x top n_best end tokens of each window, kept when both are context tokens (offsets not None),
    end >= start and the span has <= max_answer_length tokens; score = start + end logit; the best over windows.

    start_logits / end_logits: one 1-D tensor (T_i,) per feature (a padded (F, T) tensor works too). Returns dicts
    {"id", "answer", "score", "null_score", "start_char", "end_char", "n_best"}: answer = context[start_char:
    end_char]; null_score = min over the windows of start[cls] + end[cls] (+inf for an example without windows);
    n_best = up to n_best {"text", "score"} spans, best first, each text once (its best window). With
    null_threshold None the best span is always the answer (SQuAD v1.1); a number answers "" when null_score -
    score > null_threshold (SQuAD v2.0). An example with no valid span answers "" with score -inf; a "" answer has
    start_char = end_char = 0."""
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"expected one start and one end logit row per feature ({len(features)}), found "
                         f"{len(start_logits)} and {len(end_logits)}")
    if n_best < 1 or max_answer_length < 1:
        raise ValueError(f"n_best and max_answer_length must be >= 1, found {n_best} and {max_answer_length}")
    if isinstance(start_logits, Tensor):  # one transfer for a padded (F, T) tensor, not one per row
        start_logits = start_logits.detach().to("cpu", torch.float64)  # (F, T)
    if isinstance(end_logits, Tensor):
        end_logits = end_logits.detach().to("cpu", torch.float64)  # (F, T)
    windows: list[list[int]] = [[] for _ in examples]
    for i, feature in enumerate(features):
        if not 0 <= feature.example < len(examples):
            raise ValueError(f"features[{i}].example = {feature.example}, expected an index into the "
                             f"{len(examples)} examples")
        windows[feature.example].append(i)
    spans, nulls = _feature_spans(features, start_logits, end_logits, n_best, max_answer_length)
    out = []
    for example, mine in zip(examples, windows):
        pool = [(sc, i, a, b) for i in mine for sc, a, b in spans[i]]
        pool.sort(key=lambda c: -c[0])  # stable: ties keep window order, then start/end rank order
        listed: list[dict[str, Any]] = []
        seen: set[str] = set()
        best: tuple[int, int] | None = None
        for sc, i, a, b in pool:
            offsets = features[i].offsets
            lo, hi = offsets[a][0], offsets[b][1]
            if best is None:
                best = (lo, hi)
            text = example.context[lo:hi]
            if text not in seen:
                seen.add(text)
                listed.append({"text": text, "score": sc})
                if len(listed) == n_best:
                    break
        null = min((nulls[i] for i in mine), default=math.inf)
        score = pool[0][0] if pool else -math.inf
        if best is None or (null_threshold is not None and null - score > null_threshold):
            best = (0, 0)
        out.append({"id": example.id, "answer": example.context[best[0]:best[1]], "score": score, "null_score": null,
                    "start_char": best[0], "end_char": best[1], "n_best": listed})
    return out



def answer_questions(model: nn.Module, tok: Any, examples: Sequence[QAExample], settings: QAData, *,
                     batch_size: int = 32) -> list[dict[str, Any]]:
    """The answer to each `data.qa.QAExample` (its gold answers unused) by a span model: windows and decoding as
    `settings` says, logits in batches, decoded by `decode_answers` — what `lmforge generate`, the server's /v1/qa
    and `evaluate --tasks qa:PATH` run."""
    from ..data.qa import QACollate, qa_features

    settings.validate()
    features = qa_features(examples, tok, settings.max_length, settings.doc_stride, settings.max_question_length)
    collate = QACollate(tok.padding_id)
    batches = (collate(features[i:i + batch_size]) for i in range(0, len(features), batch_size))
    starts, ends = span_logits(model, batches)
    return decode_answers(examples, features, starts, ends, **settings.decoding())
