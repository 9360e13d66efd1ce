"""Sequence classification and regression data: `{"text", "label"}` records (+ optional `"text_pair"`).

`read_classification` turns JSONL / Parquet / CSV records into examples with a label id (classify) or a float
target (regress), stopping at the first bad record with its file:line; `split_validation` holds out a stable
fraction; `tokenize_examples` frames each example the way its model expects; `ClassifyCollate` pads batches.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from tokenizers import Encoding
from torch import Tensor

from ..tokenizer.base import Tokenizer
from ..splits import split_by_hash
from .examples import pad_right, pair_framing
from .readers import DataError, ReadStats, iter_records, record_keys, record_string

log = logging.getLogger(__name__)

__all__ = ["load_classification_data", "ClassifyData", "ClassifyExample", "ClassifyStats", "TokenizedExample",
           "read_classification",
           "split_validation", "tokenize_examples", "ClassifyCollate", "classification_outputs"]

Task = Literal["classify", "regress"]


@dataclass
class ClassifyData:
    """Fields of classification / regression records and how they become examples."""

    text_field: str = "text"
    """Record field holding the text."""
    text_pair_field: str | None = "text_pair"
    """Record field holding a second text (sentence pairs), used when a record has it; null: never."""
    label_field: str = "label"
    """Record field holding the class label (classify) or the numeric target (regress)."""
    labels: list[str] | None = None
    """The label set in id order; default: the sorted labels of the training data (numerically if all integers)."""
    drop_labels: list[str] = field(default_factory=list)
    """Skip records with these labels (counted in the read stats), e.g. ["neutral"] for binary sentiment."""
    max_length: int = 128
    """Tokens per example, special tokens included; longer examples are truncated (longest text first)."""

    def validate(self) -> None:
        if self.max_length < 4:
            raise ValueError(f"max_length must be >= 4 (room for the special tokens), found {self.max_length}")
        if self.labels is not None:
            dup = [k for k, n in Counter(self.labels).items() if n > 1]
            if dup:
                raise ValueError(f"labels lists {dup} more than once; expected each label once, in id order")
            both = sorted(set(self.labels) & set(self.drop_labels))
            if both:
                raise ValueError(f"labels {both} are in both labels and drop_labels; expected one or the other")
        if self.label_field in (self.text_field, self.text_pair_field):
            raise ValueError(f"label_field {self.label_field!r} is also a text field")


@dataclass(slots=True)
class ClassifyExample:
    """One labelled record: where it came from, its text (and pair), a label id or a float target."""

    where: str
    text: str
    text_pair: str | None
    label: int | float


@dataclass
class ClassifyStats:
    """What reading kept and skipped: nothing is dropped without being counted here."""

    records: int = 0
    """Records read."""
    examples: int = 0
    """Records kept as examples."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Records skipped for a label in drop_labels, by label."""
    label_counts: dict[str, int] = field(default_factory=dict)
    """Kept examples by label (classify only)."""
    replaced: int = 0
    """Undecodable UTF-8 sequences replaced by U+FFFD while reading."""
    replaced_first: str | None = None
    """The first file (and line) that had one."""

    def __str__(self) -> str:
        msg = f"{self.records} records, {self.examples} kept"
        if self.label_counts:
            msg += " (" + ", ".join(f"{k} {v}" for k, v in self.label_counts.items()) + ")"
        if self.dropped:
            msg += "; dropped by drop_labels: " + ", ".join(f"{k} {v}" for k, v in self.dropped.items())
        if self.replaced:
            msg += f"; {self.replaced} undecodable byte sequences replaced by U+FFFD (first: {self.replaced_first})"
        return msg


def _pair(record: dict[str, Any], key: str | None, where: str) -> str | None:
    if key is None or record.get(key) in (None, ""):  # absent, JSON null, Parquet null or an empty CSV cell
        return None
    return record_string(record, key, where, "text pair")


def _class_label(value: Any, key: str, where: str) -> str:
    """Labels become strings: "pos" stays, 1 (or 1.0) becomes "1", true becomes "true"."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value
    raise DataError(f"{where}: label {key!r} is {type(value).__name__} {str(value)[:40]!r}; expected a class name "
                    f"(string) or an integer class (use task=regress for numeric targets)")


def _target(value: Any, key: str, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {key!r} is {type(value).__name__} {str(value)[:40]!r}; expected a number "
                        f"(regression target)") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: label {key!r} is {value!r}; expected a finite number")
    return x


def _sorted_labels(labels: set[str]) -> list[str]:
    if all(s.lstrip("-").isdigit() for s in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def read_classification(paths: str | os.PathLike | Sequence[str | os.PathLike], cfg: ClassifyData,
                        task: Task = "classify", label2id: dict[str, int] | None = None,
                        ) -> tuple[list[ClassifyExample], dict[str, int] | None, ClassifyStats]:
    """Read labelled records into examples; returns (examples, label2id, stats).

    The label map is `label2id` when given (validation data: labels must be among the training labels), else
    `cfg.labels` in order, else the sorted labels found. Regression returns label2id None."""
    if task not in ("classify", "regress"):
        raise ValueError(f"task must be 'classify' or 'regress', found {task!r}")
    stats, read = ClassifyStats(), ReadStats()
    drop = set(cfg.drop_labels)
    fixed = label2id if label2id is not None else (
        {name: i for i, name in enumerate(cfg.labels)} if cfg.labels is not None else None)
    raw: list[tuple[str, str, str | None, Any]] = []
    for where, rec in iter_records(paths, stats=read):
        stats.records += 1
        if cfg.label_field not in rec or rec[cfg.label_field] is None:
            raise DataError(f"{where}: no {cfg.label_field!r} value (found keys {record_keys(rec)}); expected the "
                            f"label in {cfg.label_field!r}")
        value = rec[cfg.label_field]
        if task == "classify":
            value = _class_label(value, cfg.label_field, where)
            if value in drop:
                stats.dropped[value] = stats.dropped.get(value, 0) + 1
                continue
            if fixed is not None and value not in fixed:
                known = list(fixed)
                if label2id is not None:
                    raise DataError(f"label {value!r} at {where} was not in the training labels {known}")
                raise DataError(f"label {value!r} at {where} is not one of the configured labels {known} "
                                f"(add it to labels, or to drop_labels to skip such records)")
        else:
            value = _target(value, cfg.label_field, where)
        text = record_string(rec, cfg.text_field, where, "text")
        raw.append((where, text, _pair(rec, cfg.text_pair_field, where), value))
    stats.replaced, stats.replaced_first = read.replaced, (read.replaced_files or [None])[0]
    shown = ", ".join(map(str, [paths] if isinstance(paths, (str, os.PathLike)) else paths))
    if not raw:
        raise DataError(f"no examples in [{shown}]: {stats.records} records read, all dropped {stats.dropped}")
    if task == "regress":
        stats.examples = len(raw)
        return [ClassifyExample(w, t, p, v) for w, t, p, v in raw], None, stats
    if fixed is None:
        found = _sorted_labels({r[3] for r in raw})
        if len(found) < 2:
            raise DataError(f"[{shown}]: every example has label {found[0]!r}; expected at least 2 classes "
                            f"(or set labels to the full label set)")
        fixed = {name: i for i, name in enumerate(found)}
    counts = Counter(r[3] for r in raw)
    stats.label_counts = {name: counts.get(name, 0) for name in fixed}
    stats.examples = len(raw)
    return [ClassifyExample(w, t, p, fixed[v]) for w, t, p, v in raw], dict(fixed), stats


def split_validation(examples: Sequence[ClassifyExample], fraction: float,
                     seed: int = 0) -> tuple[list[ClassifyExample], list[ClassifyExample]]:
    """(train, validation): an example is held out by a hash of its text (and pair), so the split is stable,
    independent of order, and duplicates of a text never straddle it."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), found {fraction}")
    return split_by_hash(examples, lambda ex: ex.text if ex.text_pair is None else ex.text + "\x1f" + ex.text_pair,
                         fraction, seed)


@dataclass(slots=True)
class TokenizedExample:
    """Model inputs of one example: token ids, token type ids (encoders) and the label id / target."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    label: int | float
    where: str


def _longest_first(la: int, lb: int, budget: int) -> tuple[int, int]:
    """Lengths after trimming the longer text first (the `tokenizers` "longest_first" rule)."""
    if la + lb <= budget:
        return la, lb
    if lb == 0:
        return budget, 0
    short = min(la, lb)
    if short * 2 <= budget:
        short_n, long_n = short, budget - short
    else:
        short_n, long_n = budget // 2, budget - budget // 2
    return (short_n, long_n) if la <= lb else (long_n, short_n)


def tokenize_examples(examples: Sequence[ClassifyExample], tokenizer: Tokenizer,
                      max_length: int) -> tuple[list[TokenizedExample], int]:
    """Token ids of each example, at most `max_length` with special tokens; returns (examples, truncated count).

    Encoders (the tokenizer has a CLS token) use the tokenizer's own framing, ``[CLS] A [SEP] (B [SEP])`` with
    token type ids 0 / 1, from its post-processor. Decoders get ``A <eos> (B <eos>)`` (after any prefix such as BOS
    that their post-processor adds): the classifier pools the last real token, so every sequence ends in the same
    fixed token, which has seen the whole input. Pairs are truncated longest text first."""
    backend = tokenizer.backend
    encoder, eos = pair_framing(tokenizer, "mark the sequence for the classifier head")
    firsts = backend.encode_batch([e.text for e in examples], add_special_tokens=False)
    paired = [i for i, e in enumerate(examples) if e.text_pair is not None]
    seconds = dict(zip(paired, backend.encode_batch([examples[i].text_pair for i in paired],
                                                    add_special_tokens=False)))
    out, truncated = [], 0
    for i, ex in enumerate(examples):
        a, b = firsts[i], seconds.get(i)
        if encoder:  # the post-processor's framing, or [CLS] A [SEP] (B [SEP]) by hand without one
            n_special = backend.num_special_tokens_to_add(b is not None) or 2 + (b is not None)
        else:  # the post-processor's prefix (e.g. BOS) on A, then A <eos> (B <eos>)
            n_special = backend.num_special_tokens_to_add(False) + 1 + (b is not None)
        budget = max_length - n_special
        if budget < 1 + (b is not None):
            raise ValueError(f"max_length {max_length} leaves no room for text next to {n_special} special tokens")
        la, lb = _longest_first(len(a.ids), len(b.ids) if b is not None else 0, budget)
        if la < len(a.ids) or (b is not None and lb < len(b.ids)):
            truncated += 1
            a.truncate(la)
            if b is not None:
                b.truncate(lb)
        ids, types = _frame(tokenizer, a, b, encoder, eos)
        out.append(TokenizedExample(ids, types, ex.label, ex.where))
    return out, truncated


def _frame(tokenizer: Tokenizer, a: Encoding, b: Encoding | None, encoder: bool,
           eos: int | None) -> tuple[list[int], list[int] | None]:
    """(input ids, token type ids or None) of already truncated texts, with the special tokens around them."""
    backend = tokenizer.backend
    if not encoder:
        first = backend.post_process(a, None, add_special_tokens=True).ids  # e.g. BOS A for Llama-style templates
        return first + [eos] + (b.ids + [eos] if b is not None else []), None
    if backend.num_special_tokens_to_add(b is not None) > 0:
        enc = backend.post_process(a, b, add_special_tokens=True)
        return enc.ids, enc.type_ids
    cls, sep = tokenizer.token_id(tokenizer.cls_token), tokenizer.token_id(tokenizer.sep_token)
    if sep is None:
        raise ValueError("the tokenizer has a CLS token but no SEP token and no post-processor to frame inputs")
    ids = [cls] + a.ids + [sep] + (b.ids + [sep] if b is not None else [])
    return ids, [0] * (len(a.ids) + 2) + [1] * (len(b.ids) + 1 if b is not None else 0)


class ClassifyCollate:
    """Right-padded batches: input_ids, attention_mask, token_type_ids (B, T) and labels (B,)."""

    def __init__(self, pad_id: int, task: Task = "classify"):
        if pad_id is None:
            raise ValueError("pad_id is None: give the tokenizer's pad (or, for decoders without one, eos) token id")
        self.pad_id, self.task = pad_id, task

    def __call__(self, examples: list[TokenizedExample]) -> dict[str, Tensor]:
        batch = pad_right([e.input_ids for e in examples], self.pad_id, [e.token_type_ids for e in examples])
        dtype = torch.long if self.task == "classify" else torch.float32
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=dtype)  # (B,)
        return batch


def classification_outputs(texts: Sequence[str], logits: Tensor, id2label: dict[int, str] | None,
                           digits: int) -> list[dict[str, Any]]:
    """{"input", "output", "scores"} per text from a classifier's logits (B, K): the most probable label and each
    label's softmax probability rounded to `digits`; a one-output head (regression, reward) gives its value and
    scores None. What `lmforge generate` prints and the server's /v1/classify answers."""
    names = id2label or {i: str(i) for i in range(logits.shape[-1])}
    results: list[dict[str, Any]] = []
    for text, row in zip(texts, logits):
        if row.numel() == 1:
            results.append({"input": text, "output": row.item(), "scores": None})
        else:
            probs = row.softmax(-1)
            results.append({"input": text, "output": names[int(probs.argmax())],
                            "scores": {names[i]: round(p, digits) for i, p in enumerate(probs.tolist())}})
    return results


def load_classification_data(d: Any, task: str, tok: Tokenizer, seed: int = 0
                             ) -> tuple[list[TokenizedExample], list[TokenizedExample], "ClassifyCollate",
                                        dict[str, int], str]:
    """(training examples, validation examples, collate, label -> id, a line for the log) of a fine-tuning data
    section (train, validation, validation_fraction, classify) for task classify or regress; examples longer than
    classify.max_length are cut, with a warning."""
    examples, label2id, stats = read_classification(d.train, d.classify, task, None)
    if d.validation:
        val, _, _ = read_classification(d.validation, d.classify, task, label2id)
        train = examples
    else:
        train, val = split_validation(examples, d.validation_fraction, seed)
    summary = f"classification data: {stats}; {len(train)} train / {len(val)} validation examples"
    train_t, cut = tokenize_examples(train, tok, d.classify.max_length)
    val_t, cut_v = tokenize_examples(val, tok, d.classify.max_length)
    if cut or cut_v:
        log.warning("%d examples were longer than data.classify.max_length %d tokens and were cut", cut + cut_v,
                    d.classify.max_length)
    return train_t, val_t, ClassifyCollate(tok.padding_id, task), label2id, summary
