"""Multiple-choice benchmarks (HellaSwag, MMLU, ARC and files in their formats) scored by log-likelihood, with
prompts, tokenization and metrics that follow lm-evaluation-harness so the numbers match it.

Prompt templates (lm-eval's task YAMLs; a continuation is `" " + choice`, the target delimiter):
- HellaSwag (`hellaswag`): query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()) (or
  preprocess(ctx) when only `ctx` is given); choices = preprocess(ending); preprocess strips, turns " [title]" into
  ". ", drops "[...]" and collapses double spaces.
- MMLU (`mmlu_continuation`, the default here): "Question: {question.strip()}\\nAnswer:" and the choice texts;
  with `mmlu_template="letters"` (`mmlu`): "{question.strip()}\\nA. {c0}\\nB. {c1}…\\nAnswer:" and choices "A", "B"….
- ARC (`arc_easy` / `arc_challenge`): "Question: {question}\\nAnswer:" and choices.text.
Few-shot examples ("{query} {gold choice}") come from the same file, never the item itself, drawn as lm-eval's
ContextSampler does (one `random.Random(seed)`, n + 1 sampled per item, the item removed), joined by "\\n\\n".
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..data.readers import DataError, iter_records
from ..tokenizer.base import Tokenizer
from .harness import loglikelihood
from .metrics import mean_stderr

__all__ = ["MCItem", "read_multiple_choice", "parse_item", "build_requests", "encode_pair",
           "evaluate_multiple_choice", "hellaswag_preprocess", "fewshot_prefix", "encode_text"]

Format = Literal["auto", "hellaswag", "mmlu", "arc"]
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class MCItem:
    """One multiple-choice question, already in prompt form."""

    query: str
    """The prompt of this item alone (lm-eval's doc_to_text)."""
    choices: list[str]
    """Answer texts without the leading target delimiter (doc_to_choice)."""
    gold: int
    """Index of the correct choice (doc_to_target)."""
    source: str = ""
    """Where the item was read (``file:line``)."""


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, " [title]" -> ". ", drop bracketed artifacts, collapse double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _need(rec: dict[str, Any], key: str, where: str, fmt: str) -> Any:
    if key not in rec or rec[key] is None:
        raise DataError(f"{where}: missing field {key!r} for a {fmt} item (found fields {sorted(rec)})")
    return rec[key]


def _decoded(value: Any) -> Any:
    """Lists / objects stored as JSON text (CSV cells) are decoded; other values pass through."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _text_list(value: Any, key: str, where: str) -> list[str]:
    value = _decoded(value)
    if hasattr(value, "tolist"):  # numpy arrays from Parquet readers
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {key!r} must be a non-empty list of strings, found {value!r:.80}")
    return list(value)


def _index(label: Any, n: int, key: str, where: str, names: Sequence[str] | None = None) -> int:
    """A gold index from an int, a digit string, a letter, or one of `names` (ARC's choice labels)."""
    idx: int | None = None
    if names is not None and isinstance(label, (str, int)) and str(label) in [str(x) for x in names]:
        idx = [str(x) for x in names].index(str(label))
    elif isinstance(label, bool):
        idx = None
    elif isinstance(label, int) or (isinstance(label, float) and label.is_integer()):
        idx = int(label)
    elif isinstance(label, str) and label.strip().lstrip("-").isdigit():
        idx = int(label.strip())
    elif isinstance(label, str) and len(label.strip()) == 1 and label.strip().upper() in _LETTERS:
        idx = _LETTERS.index(label.strip().upper())
    if idx is None or not 0 <= idx < n:
        expected = f"one of {list(names)}" if names is not None else f"an index in [0, {n}) or a letter A-{_LETTERS[n - 1]}"
        raise DataError(f"{where}: label {key}={label!r} is out of range for {n} choices; expected {expected}")
    return idx


def _detect(rec: dict[str, Any], where: str) -> str:
    if "endings" in rec:
        return "hellaswag"
    choices = _decoded(rec.get("choices"))
    if isinstance(choices, dict) or "answerKey" in rec:
        return "arc"
    if "choices" in rec or ("question" in rec and "A" in rec):
        return "mmlu"
    raise DataError(f"{where}: cannot tell the multiple-choice format from fields {sorted(rec)}; expected "
                    f"HellaSwag (ctx or ctx_a+ctx_b, endings, label), MMLU (question, choices, answer) or "
                    f"ARC (question, choices {{text, label}}, answerKey)")


def parse_item(rec: dict[str, Any], where: str, fmt: Format = "auto",
               mmlu_template: Literal["continuation", "letters"] = "continuation") -> MCItem:
    """One record of a HellaSwag / MMLU / ARC file as an `MCItem` with lm-eval's prompt for that task."""
    fmt = _detect(rec, where) if fmt == "auto" else fmt
    if fmt == "hellaswag":
        if "ctx_a" in rec and "ctx_b" in rec:
            ctx = str(rec["ctx_a"]) + " " + str(rec["ctx_b"]).capitalize()
        else:
            ctx = str(_need(rec, "ctx", where, fmt))
        if rec.get("activity_label"):
            ctx = str(rec["activity_label"]) + ": " + ctx
        endings = _text_list(_need(rec, "endings", where, fmt), "endings", where)
        gold = _index(_need(rec, "label", where, fmt), len(endings), "label", where)
        return MCItem(hellaswag_preprocess(ctx), [hellaswag_preprocess(e) for e in endings], gold, where)
    if fmt == "mmlu":
        question = str(_need(rec, "question", where, fmt))
        if "choices" in rec:
            choices = _text_list(rec["choices"], "choices", where)
        else:
            letters = [c for c in _LETTERS if c in rec]
            if not letters:
                raise DataError(f"{where}: missing field 'choices' for a mmlu item (or columns A, B, C, D; found "
                                f"fields {sorted(rec)})")
            choices = [str(rec[c]) for c in letters]
        gold = _index(_need(rec, "answer", where, fmt), len(choices), "answer", where)
        if mmlu_template == "letters":
            lines = "".join(f"\n{_LETTERS[i]}. {c}" for i, c in enumerate(choices))
            return MCItem(f"{question.strip()}{lines}\nAnswer:", list(_LETTERS[:len(choices)]), gold, where)
        return MCItem(f"Question: {question.strip()}\nAnswer:", choices, gold, where)
    if fmt == "arc":
        question = str(_need(rec, "question", where, fmt))
        choices = _decoded(_need(rec, "choices", where, fmt))
        if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
            raise DataError(f"{where}: field 'choices' of an arc item must be {{\"text\": [...], \"label\": [...]}}, "
                            f"found {choices!r:.80}")
        texts = _text_list(choices["text"], "choices.text", where)
        labels = list(choices["label"].tolist() if hasattr(choices["label"], "tolist") else choices["label"])
        if len(labels) != len(texts):
            raise DataError(f"{where}: {len(texts)} choices.text but {len(labels)} choices.label")
        gold = _index(_need(rec, "answerKey", where, fmt), len(texts), "answerKey", where, names=labels)
        return MCItem(f"Question: {question}\nAnswer:", texts, gold, where)
    raise ValueError(f"unknown multiple-choice format {fmt!r}; expected auto, hellaswag, mmlu or arc")


def read_multiple_choice(path: str | os.PathLike | Sequence[str | os.PathLike], fmt: Format = "auto",
                         mmlu_template: Literal["continuation", "letters"] = "continuation") -> list[MCItem]:
    """Every item of JSONL / Parquet / CSV file(s); bad records raise DataError naming file and line."""
    return [parse_item(rec, where, fmt, mmlu_template) for where, rec in iter_records(path)]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models: trailing spaces of the context move to the continuation, the
    whole string is encoded and split after the tokens of the context alone."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode_text(tokenizer, context + continuation)
    ctx = encode_text(tokenizer, context)
    return ctx, whole[len(ctx):]


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """lm-eval's `tok_encode`: the tokenizer's own special tokens, unless the text already starts with the prefix."""
    prefix = tokenizer.bos_token or tokenizer.eos_token
    return tokenizer.encode(text, add_special_tokens=not (prefix and text.startswith(prefix)))


def fewshot_prefix(shots: Sequence[str], i: int, n: int, rnd: random.Random) -> str:
    """lm-eval's ContextSampler on a pool that holds item i: sample n + 1, drop the item, keep n; each shot (an
    item written out with its answer) is followed by the few-shot delimiter "\\n\\n"."""
    if n == 0:
        return ""
    if n >= len(shots):
        raise ValueError(f"num_fewshot={n} needs more than {n} items, the file has {len(shots)}")
    picked = [j for j in rnd.sample(range(len(shots)), n + 1) if j != i][:n]
    return "".join(shots[j] + "\n\n" for j in picked)


def build_requests(items: Sequence[MCItem], num_fewshot: int = 0, seed: int = 1234, description: str = "",
                   limit: int | None = None) -> list[tuple[str, list[str]]]:
    """(context, continuations) per evaluated item: description + few-shot examples + query, and " " + choice."""
    rnd = random.Random(seed)
    shots = [f"{it.query} {it.choices[it.gold]}" for it in items] if num_fewshot else []
    out = []
    for i, item in enumerate(items[:limit] if limit is not None else items):
        context = description + fewshot_prefix(shots, i, num_fewshot, rnd) + item.query
        out.append((context, [" " + c for c in item.choices]))
    return out


def _argmax(xs: Sequence[float]) -> int:
    """First index of the maximum (numpy's argmax tie rule)."""
    return max(range(len(xs)), key=lambda k: (xs[k], -k))


def evaluate_multiple_choice(model, tokenizer: Tokenizer, items: Sequence[MCItem], num_fewshot: int = 0,
                             batch_size: int = 16, limit: int | None = None, seed: int = 1234,
                             description: str = "") -> dict[str, Any]:
    """Score every choice by log-likelihood; report acc, acc_norm (log-likelihood / characters of the choice, as
    lm-eval), acc_bytes (/ UTF-8 bytes), acc_norm_token (/ continuation tokens), their standard errors, the exact
    prompts of the first 3 items and each item's log-likelihoods and predictions."""
    if not items:
        raise ValueError("no multiple-choice items to evaluate")
    prompts = build_requests(items, num_fewshot, seed, description, limit)
    requests: list[tuple[list[int], list[int]]] = []
    for context, conts in prompts:
        requests.extend(encode_pair(tokenizer, context, c) for c in conts)
    scores = loglikelihood(model, requests, batch_size=batch_size)
    keys = ("acc", "acc_norm", "acc_bytes", "acc_norm_token")
    hits: dict[str, list[float]] = {k: [] for k in keys}
    per_item = []
    at = 0
    for item, (context, conts) in zip(items, prompts):
        lls = [scores[at + k][0] for k in range(len(conts))]
        ntok = [max(1, len(requests[at + k][1])) for k in range(len(conts))]
        at += len(conts)
        preds = {
            "acc": _argmax(lls),
            "acc_norm": _argmax([ll / len(c) for ll, c in zip(lls, item.choices)]),
            "acc_bytes": _argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, item.choices)]),
            "acc_norm_token": _argmax([ll / n for ll, n in zip(lls, ntok)]),
        }
        for k in keys:
            hits[k].append(1.0 if preds[k] == item.gold else 0.0)
        per_item.append({"source": item.source, "gold": item.gold, "loglikelihoods": lls,
                         "pred": preds["acc"], "pred_norm": preds["acc_norm"]})
    report: dict[str, Any] = {"n": len(prompts), "num_fewshot": num_fewshot}
    for k in keys:
        report[k] = sum(hits[k]) / len(hits[k])
        report[f"{k}_stderr"] = mean_stderr(hits[k])[1] if len(hits[k]) > 1 else float("nan")
    report["examples"] = [{"context": c, "continuations": conts} for c, conts in prompts[:3]]
    report["per_item"] = per_item
    return report
