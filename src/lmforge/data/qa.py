"""Extractive question answering data: SQuAD v1.1 / v2.0 JSON and `{"context", "question", "answers"}` records.

`read_qa` turns files into examples (every gold answer checked against its answer_start, stopping at the first bad
record with its file:line or JSON path); `qa_features` cuts each example's context into overlapping windows of
tokens framed with the question, with gold start / end token positions and per-token character offsets;
`QACollate` pads windows into batches; `load_qa_data` does all of it for the finetune stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..splits import split_by_hash
from ..tokenizer.base import Tokenizer
from .examples import pad_right, pair_framing
from .readers import (DataError, ReadStats, decode_utf8, expand_inputs, iter_records, record_keys,
                      record_string)

__all__ = ["QACollate", "QAData", "QAExample", "QAFeature", "QAStats", "load_qa_data", "qa_features", "read_qa"]

_RECORD_FILES = ("*.jsonl", "*.jsonl.gz", "*.ndjson", "*.parquet", "*.csv")
_SQUAD_SHAPE = '{"version", "data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}'


@dataclass
class QAData:
    """Fields and windows of extractive-QA records (task qa)."""

    max_length: int = 384
    """Tokens per window, special tokens included."""
    doc_stride: int = 128
    """Tokens shared by consecutive windows of a long context."""
    max_question_length: int = 64
    """Questions longer than this many tokens are cut (and counted)."""
    n_best: int = 20
    """Evaluation: start and end candidates per window when decoding answers."""
    max_answer_length: int = 30
    """Evaluation: longest answer span in tokens."""
    null_threshold: float | None = None
    """Evaluation: answer "" when the no-answer score beats the best span by more than this (SQuAD v2.0, e.g. 0.0);
    null: always answer (SQuAD v1.1)."""

    def within(self, positions: int) -> "QAData":
        """These settings for a model of `positions` positions: windows no longer than it, the stride a quarter of
        a shortened window (at most the configured one)."""
        if positions >= self.max_length:
            return self
        return replace(self, max_length=positions, doc_stride=min(self.doc_stride, positions // 4),
                       max_question_length=min(self.max_question_length, positions // 4))

    def decoding(self) -> dict[str, Any]:
        """The answer-decoding settings as keyword arguments of `objectives.span.decode_answers`."""
        return {"n_best": self.n_best, "max_answer_length": self.max_answer_length,
                "null_threshold": self.null_threshold}

    def validate(self) -> None:
        if self.n_best < 1:
            raise ValueError(f"n_best: must be >= 1, found {self.n_best}")
        if self.max_answer_length < 1:
            raise ValueError(f"max_answer_length: must be >= 1, found {self.max_answer_length}")
        if self.max_question_length < 1:
            raise ValueError(f"max_question_length: must be >= 1, found {self.max_question_length}")
        if self.max_length <= self.max_question_length + 3 + 1:
            raise ValueError(f"max_length: {self.max_length} leaves no context token after a question of "
                             f"max_question_length {self.max_question_length} and 3 special tokens; expected more "
                             f"than {self.max_question_length + 4}")
        window = self.max_length - self.max_question_length - 3
        if not 0 <= self.doc_stride < window:
            raise ValueError(f"doc_stride: {self.doc_stride} must be in [0, {window}) (the context tokens of a window "
                             f"after the longest question), so that each window moves on")


@dataclass
class QAStats:
    """What reading and windowing did: nothing is dropped or cut without being counted here."""

    records: int = 0
    """Questions read (SQuAD qas entries or records)."""
    examples: int = 0
    """Examples kept (every record becomes one; bad records stop the read)."""
    unanswerable: int = 0
    """Examples without an answer (SQuAD v2.0 is_impossible, or an empty answers list)."""
    replaced: int = 0
    """Undecodable UTF-8 sequences replaced by U+FFFD while reading."""
    windows: int = 0
    """Features (windows) made by qa_features."""
    questions_cut: int = 0
    """Questions longer than max_question_length tokens, cut to it."""
    answers_outside: int = 0
    """Answerable examples whose first answer lies wholly inside no window (every window points at cls_index)."""

    def __str__(self) -> str:
        msg = f"{self.records} records, {self.examples} examples ({self.unanswerable} unanswerable)"
        if self.windows:
            msg += f", {self.windows} windows"
        if self.questions_cut:
            msg += f"; {self.questions_cut} questions cut to max_question_length"
        if self.answers_outside:
            msg += f"; {self.answers_outside} answers inside no single window (all their windows say no answer)"
        if self.replaced:
            msg += f"; {self.replaced} undecodable byte sequences replaced by U+FFFD"
        return msg


@dataclass(slots=True)
class QAExample:
    """One question on one context with its gold answers ((text, character start) pairs; [] = unanswerable)."""

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]
    where: str


@dataclass(slots=True)
class QAFeature:
    """One window of one example: framed token ids, per-token context character offsets and gold positions."""

    example: int
    input_ids: list[int]
    token_type_ids: list[int] | None
    offsets: list[tuple[int, int] | None]
    start: int
    end: int
    cls_index: int


# ----------------------------------------------------------------------------- reading


def _answer(context: str, text: Any, start: Any, where: str) -> tuple[str, int]:
    """(text, start) after checking that the answer text occurs in the context at its answer_start."""
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: answer text is {type(text).__name__} {str(text)[:40]!r}; expected a non-empty "
                        f"string")
    if isinstance(start, bool) or not isinstance(start, int):
        raise DataError(f"{where}: answer_start is {type(start).__name__} {str(start)[:40]!r}; expected an integer "
                        f"character offset into the context")
    if not 0 <= start < len(context):
        raise DataError(f"{where}: answer_start {start} is out of range; expected 0 <= answer_start < "
                        f"{len(context)} (the context's length in characters)")
    found = context[start:start + len(text)]
    if found != text:
        raise DataError(f"{where}: answer {text[:60]!r} is not at answer_start {start} of the context (found "
                        f"{found[:60]!r}); expected the answer text to start there")
    return text, start


def _record_answers(rec: dict[str, Any], context: str, where: str) -> list[tuple[str, int]]:
    """The answers of a record: {"text": [...], "answer_start": [...]} (HF datasets) or [{"text", "answer_start"}]."""
    if "answers" not in rec or rec["answers"] is None:
        raise DataError(f"{where}: no 'answers' field (found keys {record_keys(rec)}); expected \"answers\": "
                        f"{{\"text\": [...], \"answer_start\": [...]}} ([] lists for an unanswerable question)")
    ans = rec["answers"]
    if isinstance(ans, str) and ans.strip()[:1] in ("{", "["):  # a CSV cell of JSON text
        try:
            ans = json.loads(ans)
        except ValueError:
            pass
    if isinstance(ans, dict):
        if "text" not in ans or "answer_start" not in ans:
            raise DataError(f"{where}: answers has keys {record_keys(ans)}; expected 'text' and 'answer_start' lists")
        texts, starts = ans["text"], ans["answer_start"]
        if not isinstance(texts, list) or not isinstance(starts, list):
            raise DataError(f"{where}: answers 'text' is {type(texts).__name__} and 'answer_start' is "
                            f"{type(starts).__name__}; expected two lists of the same length")
        if len(texts) != len(starts):
            raise DataError(f"{where}: answers has {len(texts)} texts and {len(starts)} answer_starts; expected one "
                            f"answer_start per text")
        return [_answer(context, t, s, f"{where}: answers[{i}]") for i, (t, s) in enumerate(zip(texts, starts))]
    if isinstance(ans, list):
        out = []
        for i, a in enumerate(ans):
            if not isinstance(a, dict) or "text" not in a or "answer_start" not in a:
                raise DataError(f"{where}: answers[{i}] has keys {record_keys(a)}; expected an object with 'text' and "
                                f"'answer_start'")
            out.append(_answer(context, a["text"], a["answer_start"], f"{where}: answers[{i}]"))
        return out
    raise DataError(f"{where}: answers is {type(ans).__name__} {str(ans)[:40]!r}; expected {{\"text\": [...], "
                    f"\"answer_start\": [...]}} or a list of {{\"text\", \"answer_start\"}}")


def _record_id(value: Any, default: str, where: str) -> str:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{where}: 'id' is {type(value).__name__} {str(value)[:40]!r}; expected a string or an "
                        f"integer")
    return str(value)


def _read_records(path: Path, stats: ReadStats) -> list[QAExample]:
    out = []
    for where, rec in iter_records(path, stats=stats):
        context = record_string(rec, "context", where)
        question = record_string(rec, "question", where)
        line = where[len(str(path)) + 1:].removeprefix("row ")
        out.append(QAExample(_record_id(rec.get("id"), f"{path.stem}:{line}", where), question, context,
                             _record_answers(rec, context, where), where))
    return out


def _list(obj: Any, key: str, where: str, expected: str) -> list[Any]:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
        found = f"found keys {record_keys(obj)}" if isinstance(obj, dict) else f"found {record_keys(obj)}"
        raise DataError(f"{where}: no {key!r} list ({found}); expected {expected} (SQuAD JSON: {_SQUAD_SHAPE})")
    return obj[key]


def _read_squad(path: Path, stats: ReadStats) -> list[QAExample]:
    """The questions of a SQuAD v1.1 / v2.0 JSON file, where = "path: data[i].paragraphs[j].qas[k]"."""
    text = decode_utf8(path.read_bytes(), str(path), stats)
    try:
        top = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); expected SQuAD JSON "
                        f"{_SQUAD_SHAPE}") from None
    out, n = [], 0
    for i, article in enumerate(_list(top, "data", f"{path}: top level", "the articles in 'data'")):
        for j, para in enumerate(_list(article, "paragraphs", f"{path}: data[{i}]", "the article's paragraphs")):
            at = f"{path}: data[{i}].paragraphs[{j}]"
            qas = _list(para, "qas", at, "the paragraph's questions in 'qas'")
            context = record_string(para, "context", at)
            for k, qa in enumerate(qas):
                where = f"{at}.qas[{k}]"
                n += 1
                if not isinstance(qa, dict):
                    raise DataError(f"{where}: found a JSON {type(qa).__name__}; expected an object with 'id', "
                                    f"'question' and 'answers'")
                question = record_string(qa, "question", where)
                if not isinstance(qa.get("answers"), list):
                    raise DataError(f"{where}: no 'answers' list (found keys {record_keys(qa)}); expected a list of "
                                    f"{{\"text\", \"answer_start\"}} ([] with \"is_impossible\": true when "
                                    f"unanswerable)")
                answers = _record_answers(qa, context, where)
                impossible = qa.get("is_impossible", False)
                if impossible is True and answers:
                    raise DataError(f"{where}: is_impossible is true but {len(answers)} answers are given; expected "
                                    f"an empty 'answers' list (SQuAD v2.0 keeps them in 'plausible_answers')")
                out.append(QAExample(_record_id(qa.get("id"), f"{path.stem}:{n}", where), question, context,
                                     answers, where))
    return out


def read_qa(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[QAExample], QAStats]:
    """Examples of SQuAD JSON files (.json) and QA record files (JSONL / Parquet / CSV), in file order; every
    gold answer must occur at its answer_start and ids must be unique, else a one-line DataError."""
    read = ReadStats()
    examples: list[QAExample] = []
    for path in expand_inputs(paths, include=["*.json", *_RECORD_FILES]):
        examples += _read_squad(path, read) if path.name.endswith(".json") else _read_records(path, read)
    if not examples:
        shown = ", ".join(map(str, [paths] if isinstance(paths, (str, os.PathLike)) else paths))
        raise DataError(f"no questions in [{shown}]; expected SQuAD JSON or QA records")
    seen: dict[str, str] = {}
    for ex in examples:
        if ex.id in seen:
            raise DataError(f"{ex.where}: duplicate id {ex.id!r} (first at {seen[ex.id]}); expected unique ids")
        seen[ex.id] = ex.where
    stats = QAStats(records=len(examples), examples=len(examples), replaced=read.replaced,
                    unanswerable=sum(not ex.answers for ex in examples))
    return examples, stats


# ----------------------------------------------------------------------------- windows


def _trimmed(context: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token offsets without surrounding whitespace (byte-level BPE puts the space before a word into its token),
    so that a span of tokens slices exactly its words out of the context; whitespace-only tokens keep theirs."""
    out = []
    for s, e in offsets:
        piece = context[s:e]
        if piece.strip() and piece.strip() != piece:
            s, e = s + len(piece) - len(piece.lstrip()), e - (len(piece) - len(piece.rstrip()))
        out.append((s, e))
    return out


def _answer_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int] | None:
    """(first, last) context token of the character span [start, end): the first token ending after its first
    character and the last token starting before its end; None when no token covers any of it."""
    first = last = None
    for i, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        if first is None and e > start:
            first = i
        if s < end:
            last = i
    if first is None or last is None or last < first:
        return None
    return first, last


def _pair_template(tokenizer: Tokenizer) -> list[tuple[str, int, int]]:
    """The encoder's pair framing as parts ("A" | "B" | "special", token id, type id), learned from its
    post-processor (so [CLS] A [SEP] B [SEP], <s> A </s></s> B </s>, ... all come out as the tokenizer frames)."""
    backend = tokenizer.backend
    if backend.num_special_tokens_to_add(True) == 0:
        cls, sep = tokenizer.token_id(tokenizer.cls_token), tokenizer.token_id(tokenizer.sep_token)
        if cls is None or sep is None:
            raise ValueError("the tokenizer has a CLS token but no SEP token and no post-processor to frame pairs")
        return [("special", cls, 0), ("A", -1, 0), ("special", sep, 0), ("B", -1, 1), ("special", sep, 1)]
    a, b = backend.encode("a", add_special_tokens=False), backend.encode("b", add_special_tokens=False)
    enc = backend.post_process(a, b, add_special_tokens=True)
    parts: list[tuple[str, int, int]] = []
    texts = iter("AB?")  # the runs of non-special tokens: the question, then the context
    for tid, typ, special in zip(enc.ids, enc.type_ids, enc.special_tokens_mask):
        if special:
            parts.append(("special", tid, typ))
        elif not parts or parts[-1][0] == "special":
            parts.append((next(texts), -1, typ))
    if [p[0] for p in parts if p[0] != "special"] != ["A", "B"]:
        raise ValueError(f"the tokenizer's post-processor frames a pair as {parts}; expected one question part "
                         f"and one context part")
    return parts


def qa_features(examples: Sequence[QAExample], tokenizer: Tokenizer, max_length: int = 384, doc_stride: int = 128,
                max_question_length: int = 64, stats: QAStats | None = None) -> list[QAFeature]:
    """Windows of every example, in example order: the context's tokens cut into slices of max_length - question
    - special tokens, consecutive ones sharing `doc_stride` tokens, each framed with the question.

    Encoders (a CLS token) get their post-processor's pair framing, ``[CLS] q [SEP] w [SEP]`` with type ids 0 / 1;
    decoders ``(prefix) q <eos> w <eos>``. A window's gold start / end are the tokens holding the first answer's
    first and last characters when both are inside it, else cls_index (0). Offsets are the context tokens'
    character spans trimmed of surrounding whitespace, so ``context[offsets[start][0]:offsets[end][1]]`` is exactly
    the answer whenever the answer begins and ends on token boundaries (whole words for WordPiece and byte-level
    BPE alike), else the shortest run of whole tokens covering it. `stats` (optional) gets the counts."""
    backend = tokenizer.backend
    encoder, eos = pair_framing(tokenizer, "frame question and context")
    template = _pair_template(tokenizer) if encoder else []
    contexts = list(dict.fromkeys(ex.context for ex in examples))
    encoded = {c: (e.ids, _trimmed(c, e.offsets))
               for c, e in zip(contexts, backend.encode_batch(contexts, add_special_tokens=False))}
    questions = backend.encode_batch([ex.question.strip() for ex in examples], add_special_tokens=False)
    stats = stats if stats is not None else QAStats()
    features: list[QAFeature] = []
    for n, (ex, q) in enumerate(zip(examples, questions)):
        if len(q.ids) > max_question_length:
            stats.questions_cut += 1
            q.truncate(max_question_length)
        ids, offsets = encoded[ex.context]
        if encoder:
            n_special, prefix = sum(p[0] == "special" for p in template), []
        else:
            prefix = backend.post_process(q, None, add_special_tokens=True).ids + [eos]  # e.g. BOS q <eos>
            n_special = len(prefix) - len(q.ids) + 1
        room = max_length - len(q.ids) - n_special
        if room < 1 or (len(ids) > room and room - doc_stride < 1):  # the stride matters only to a long context
            raise ValueError(f"max_length {max_length} leaves {room} context tokens per window after a question of "
                             f"{len(q.ids)} tokens and {n_special} special tokens; expected more than doc_stride "
                             f"{doc_stride} (and at least 1)")
        gold = None
        if ex.answers:
            text, start = ex.answers[0]
            gold = _answer_tokens(offsets, start, start + len(text))
        inside = False
        lo = 0
        while True:
            hi = min(lo + room, len(ids))
            if encoder:
                f_ids, f_types, f_offs, at = _frame_encoder(template, q.ids, ids[lo:hi], offsets[lo:hi])
            else:
                at = len(prefix)
                f_ids, f_types = prefix + ids[lo:hi] + [eos], None
                f_offs = [None] * at + list(offsets[lo:hi]) + [None]
            s = e = 0
            if gold is not None and lo <= gold[0] and gold[1] < hi:
                s, e, inside = at + gold[0] - lo, at + gold[1] - lo, True
            features.append(QAFeature(n, f_ids, f_types, f_offs, s, e, 0))
            if hi >= len(ids):
                break
            lo += room - doc_stride
        if ex.answers and not inside:
            stats.answers_outside += 1
    stats.windows += len(features)
    return features


def _frame_encoder(template: list[tuple[str, int, int]], q: list[int], w: list[int],
                   w_offsets: list[tuple[int, int]]) -> tuple[list[int], list[int], list, int]:
    """(ids, type ids, offsets, index of the first context token) of one window in the encoder's pair framing."""
    ids: list[int] = []
    types: list[int] = []
    offs: list[tuple[int, int] | None] = []
    at = 0
    for kind, tid, typ in template:
        if kind == "special":
            ids.append(tid)
            offs.append(None)
            types.append(typ)
            continue
        part = q if kind == "A" else w
        if kind == "B":
            at = len(ids)
        ids += part
        types += [typ] * len(part)
        offs += [None] * len(part) if kind == "A" else list(w_offsets)
    return ids, types, offs, at


# ----------------------------------------------------------------------------- batches


class QACollate:
    """Right-padded batches of windows: input_ids, attention_mask, (token_type_ids) (B, T) and the gold
    start_positions / end_positions (B,)."""

    def __init__(self, pad_id: int):
        if pad_id is None:
            raise ValueError("pad_id is None: give the tokenizer's pad (or, for decoders without one, eos) token id")
        self.pad_id = pad_id

    def __call__(self, features: list[QAFeature]) -> dict[str, Tensor]:
        batch = pad_right([f.input_ids for f in features], self.pad_id, [f.token_type_ids for f in features])
        batch["start_positions"] = torch.tensor([f.start for f in features], dtype=torch.long)  # (B,)
        batch["end_positions"] = torch.tensor([f.end for f in features], dtype=torch.long)  # (B,)
        return batch


def load_qa_data(d: Any, tok: Tokenizer, seed: int = 0
                 ) -> tuple[list[QAFeature], list[QAExample], list[QAFeature], QACollate, str]:
    """(train windows, validation examples, validation windows, collate, a line for the log) of a fine-tuning data
    section (train, validation, validation_fraction, qa). Without validation files, validation_fraction of the
    train examples is held out by a stable hash of the context, so no context straddles the split."""
    cfg: QAData = d.qa
    cfg.validate()
    examples, stats = read_qa(d.train)
    if d.validation:
        val, vstats = read_qa(d.validation)
        train = examples
        stats.records, stats.examples = stats.records + vstats.records, stats.examples + vstats.examples
        stats.unanswerable, stats.replaced = stats.unanswerable + vstats.unanswerable, stats.replaced + vstats.replaced
    else:
        if not 0 <= d.validation_fraction < 1:
            raise ValueError(f"validation fraction must be in [0, 1), found {d.validation_fraction}")
        train, val = split_by_hash(examples, lambda ex: ex.context, d.validation_fraction, seed)
    kw = {"max_length": cfg.max_length, "doc_stride": cfg.doc_stride, "max_question_length": cfg.max_question_length}
    train_f = qa_features(train, tok, stats=stats, **kw)
    val_f = qa_features(val, tok, stats=stats, **kw)
    summary = (f"qa data: {stats}; {len(train)} train / {len(val)} validation examples, {len(train_f)} / "
               f"{len(val_f)} windows")
    return train_f, val, val_f, QACollate(tok.padding_id), summary
