"""Instruction (SFT) data: records -> conversations -> token ids with a loss mask on assistant tokens.

Formats (JSONL / Parquet / CSV records, see DESIGN.md): `{"messages": [...]}`, `{"prompt", "response"}`,
Alpaca `{"instruction", "input"?, "output"}`, preference pairs `{"prompt", "chosen", "rejected"}` (the prompt and its
chosen reply: the usual SFT step before preference optimisation), and `python_functions` — instruction pairs
derived from Python source files (each documented function becomes "write this function" -> its code).
Conversations are rendered with the model's own chat template by `tokenizer/chat.py`; labels are the next token
where that token is assistant content (or its end-of-turn token) and -100 elsewhere. Examples longer than
`max_length` are cut and counted; packing concatenates examples into rows of `max_length` tokens that cannot attend
across examples.
"""

from __future__ import annotations

import ast
import json
import logging
import textwrap
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

import torch

from ..tokenizer.chat import ChatFormatError, check_messages, clip_messages, encode_chat, useful_chars
from .readers import DataError, ReadStats, decode_utf8, expand_inputs, iter_records, replaced_note

log = logging.getLogger(__name__)

IGNORE = -100
FORMATS = ("messages", "prompt_response", "alpaca", "chosen")
_KEYS = {"messages": ("messages",), "prompt_response": ("prompt", "response"), "alpaca": ("instruction", "output"),
         "chosen": ("chosen", "rejected")}


@dataclass
class SFTExample:
    """One tokenized conversation: inputs and next-token labels (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]
    where: str


@dataclass
class SFTStats:
    """What happened to the records while building examples (reported by the stage)."""

    records: int = 0
    truncated: int = 0
    """Examples cut to max_length."""
    no_target: int = 0
    """Examples left without any assistant token after truncation (skipped; `first_no_target` names one)."""
    clipped: int = 0
    """Records with a message longer than max_length could use, cut to that before tokenizing (bounded memory)."""
    first_no_target: str | None = None
    formats: dict[str, int] = field(default_factory=dict)
    read: ReadStats = field(default_factory=ReadStats)
    """What reading found (undecodable bytes replaced)."""


def detect_format(record: dict[str, Any], where: str) -> str:
    """Which SFT format a record is in, by its keys."""
    for fmt in FORMATS:
        if all(k in record for k in _KEYS[fmt]):
            return fmt
    keys = ", ".join(map(repr, list(record)[:8])) or "none"
    raise DataError(f"{where}: found keys {keys}; expected an SFT record: {{\"messages\": [...]}}, "
                    f"{{\"prompt\", \"response\"}}, {{\"instruction\", \"input\", \"output\"}} or "
                    f"{{\"prompt\", \"chosen\", \"rejected\"}}")


def _text(record: dict[str, Any], key: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} is {type(value).__name__} {str(value)[:40]!r}, expected a string")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: {key!r} is empty, expected text")
    return value


def to_messages(record: dict[str, Any], where: str, fmt: str = "auto",
                system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation a record describes (a system prompt is added to formats that have none)."""
    fmt = detect_format(record, where) if fmt == "auto" else fmt
    missing = [k for k in _KEYS[fmt] if k not in record]
    if missing:
        raise DataError(f"{where}: missing {', '.join(map(repr, missing))} (found keys "
                        f"{', '.join(map(repr, list(record)[:8]))}); expected a {fmt} record")
    if fmt == "chosen":
        from .preference import read_pair

        pair = read_pair(record, where, system_prompt)
        return pair.prompt + pair.chosen
    if fmt == "messages":
        try:
            messages = check_messages(record["messages"], where)
        except ChatFormatError as e:
            raise DataError(str(e)) from None
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    else:
        if fmt == "prompt_response":
            user, answer = _text(record, "prompt", where), _text(record, "response", where)
        else:
            user = _text(record, "instruction", where)
            extra = _text(record, "input", where, allow_empty=True) if record.get("input") is not None else ""
            user = f"{user}\n\n{extra}" if extra.strip() else user
            answer = _text(record, "output", where)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to train on")
    for i in answers:
        if not messages[i]["content"].strip():
            raise DataError(f"{where}: message {i} is an empty assistant turn; expected the answer text")
    return messages


def python_function_pairs(paths: str | Sequence[str], min_doc: int = 20, max_code: int = 2000,
                          stats: ReadStats | None = None) -> Iterator[tuple[str, dict[str, str]]]:
    """Instruction pairs from Python source: for each function with a docstring, the prompt asks for a function
    with that name, signature and documentation, and the response is its code (docstring removed)."""
    stats = stats if stats is not None else ReadStats()
    for path in expand_inputs(paths, include=["*.py"]):
        source = decode_utf8(path.read_bytes(), str(path), stats)
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):  # files written for other Python versions, test fixtures
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < min_doc or node.name.startswith("_"):
                continue
            body = node.body[1:]  # without the docstring
            if not body:
                continue
            start = (node.decorator_list[0] if node.decorator_list else node).lineno
            header = "\n".join(lines[start - 1:node.body[0].lineno - 1]).rstrip()
            rest = "\n".join(lines[body[0].lineno - 1:node.end_lineno])
            code = textwrap.dedent(f"{header}\n{rest}") if header.endswith(":") else None
            if code is None or len(code) > max_code:
                continue
            signature = f"{node.name}({ast.unparse(node.args)})"
            prompt = f"Write a Python function `{signature}` (module `{path.stem}`).\n\n{doc}"
            yield f"{path}:{node.lineno}", {"prompt": prompt, "response": code.rstrip() + "\n"}


def read_conversations(paths: str | Sequence[str], fmt: str = "auto", system_prompt: str | None = None,
                       stats: SFTStats | None = None) -> list[tuple[str, list[dict[str, str]]]]:
    """(where, messages) of every record in `paths`."""
    stats = stats if stats is not None else SFTStats()
    records = (python_function_pairs(paths, stats=stats.read) if fmt == "python_functions"
               else iter_records(paths, stats=stats.read))
    out = []
    for where, record in records:
        kind = "prompt_response" if fmt == "python_functions" else fmt
        if kind == "auto":
            kind = detect_format(record, where)
        out.append((where, to_messages(record, where, kind, system_prompt)))
        stats.records += 1
        stats.formats[kind] = stats.formats.get(kind, 0) + 1
    if not out:
        raise DataError(f"no SFT records in {paths}")
    return out


def tokenize_conversations(conversations: Sequence[tuple[str, list[dict[str, str]]]], tokenizer,
                           max_length: int, include_end_of_turn: bool = True,
                           stats: SFTStats | None = None) -> list[SFTExample]:
    """Token ids and shifted labels (assistant tokens only) of each conversation, cut to `max_length` inputs."""
    stats = stats if stats is not None else SFTStats()
    limit = useful_chars(tokenizer, max_length)
    out = []
    for where, messages in conversations:
        messages, clipped = clip_messages(messages, limit)
        stats.clipped += clipped
        enc = encode_chat(tokenizer, messages, include_end_of_turn=include_end_of_turn)
        ids, mask = enc.ids, enc.assistant_mask
        if len(ids) > max_length + 1:
            stats.truncated += 1
            ids, mask = ids[:max_length + 1], mask[:max_length + 1]
        labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        if all(x == IGNORE for x in labels):
            stats.no_target += 1
            stats.first_no_target = stats.first_no_target or where
            continue
        out.append(SFTExample(ids[:-1], labels, where))
    return out


def pack_examples(examples: Sequence[SFTExample], max_length: int) -> list[list[SFTExample]]:
    """Greedy first-fit packing of examples (in the given order) into rows of at most `max_length` tokens."""
    rows: list[list[SFTExample]] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex.input_ids)
        for i, r in enumerate(room):
            if n <= r:
                rows[i].append(ex)
                room[i] -= n
                break
        else:
            rows.append([ex])
            room.append(max_length - n)
    return rows


@dataclass
class SFTCollate:
    """Right-padded batches (`input_ids`, `labels`, `attention_mask` (B, T)) or, for packed rows (lists of
    examples), `position_ids` restarting at each example and a block-diagonal `attention_mask` (B, T, T)."""

    pad_id: int
    packed: bool = False

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        rows = items if self.packed else [[ex] for ex in items]
        t = max(sum(len(ex.input_ids) for ex in row) for row in rows)
        b = len(rows)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        pos = torch.zeros((b, t), dtype=torch.long)
        doc = torch.full((b, t), -1, dtype=torch.long)  # example index within its row; -1 = padding
        for i, row in enumerate(rows):
            at = 0
            for j, ex in enumerate(row):
                n = len(ex.input_ids)
                ids[i, at:at + n] = torch.tensor(ex.input_ids)
                labels[i, at:at + n] = torch.tensor(ex.labels)
                pos[i, at:at + n] = torch.arange(n)
                doc[i, at:at + n] = j
                at += n
        batch = {"input_ids": ids, "labels": labels}
        if self.packed:
            same = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)  # (B, T, T)
            batch["attention_mask"] = same | torch.eye(t, dtype=torch.bool)[None]  # padding sees itself: no NaN
            batch["position_ids"] = pos
        else:
            batch["attention_mask"] = (doc >= 0).long()
        return batch


def load_sft(paths: str | Sequence[str], tokenizer, *, fmt: str = "auto", max_length: int = 1024,
             system_prompt: str | None = None, include_end_of_turn: bool = True) -> tuple[list[SFTExample], SFTStats]:
    """Read, render and tokenize SFT data; returns the examples and what happened to the records."""
    stats = SFTStats()
    convs = read_conversations(paths, fmt, system_prompt, stats)
    return tokenize_conversations(convs, tokenizer, max_length, include_end_of_turn, stats), stats


SFTFormat = Literal["auto", "messages", "prompt_response", "alpaca", "chosen", "python_functions"]


def describe(stats: SFTStats, name: str) -> str:
    """One line for the log: records, formats, truncations, skipped."""
    msg = f"{name}: {stats.records} records ({json.dumps(stats.formats)})"
    if stats.truncated:
        msg += f"; {stats.truncated} cut to max_length"
    if stats.clipped:
        msg += f" ({stats.clipped} of them with a message clipped before tokenizing, far longer than max_length)"
    if stats.no_target:
        msg += f"; {stats.no_target} skipped with no assistant token left after truncation (first: " \
               f"{stats.first_no_target})"
    if stats.read.replaced:
        msg += f"; {replaced_note(stats.read)}"
    return msg


def load_sft_data(d: Any, tok, seed: int = 0) -> tuple[list[Any], list[Any], "SFTCollate", "SFTCollate", str]:
    """(training examples or packed rows, validation examples, training collate, validation collate, a line for the
    log) of a fine-tuning data section (train, validation, validation_fraction, format, system_prompt, max_length,
    train_end_of_turn, pack): validation from its own files or held out by a hash of each conversation."""
    import random

    from ..splits import split_by_hash

    st = SFTStats()
    convs = read_conversations(d.train, d.format, d.system_prompt, st)
    if d.validation:
        val_convs = read_conversations(d.validation, d.format, d.system_prompt, SFTStats())
    else:
        convs, val_convs = split_by_hash(convs, lambda c: json.dumps(c[1]), d.validation_fraction, seed)
    train = tokenize_conversations(convs, tok, d.max_length, d.train_end_of_turn, st)
    val = tokenize_conversations(val_convs, tok, d.max_length, d.train_end_of_turn, SFTStats())
    summary = describe(st, "sft data") + f"; {len(train)} train / {len(val)} validation examples"
    pad = tok.padding_id
    if not d.pack:
        return train, val, SFTCollate(pad), SFTCollate(pad), summary
    order = list(train)
    random.Random(seed).shuffle(order)
    rows = pack_examples(order, d.max_length)
    log.info("packed %d examples into %d rows of <= %d tokens", len(train), len(rows), d.max_length)
    return rows, val, SFTCollate(pad, packed=True), SFTCollate(pad), summary
