"""Preference data: paired records for reward models and DPO-style losses, unpaired records for KTO.

Formats (JSONL / Parquet records, see DESIGN.md):
  paired    {"prompt", "chosen", "rejected", "margin"?}: the prompt is a string (one user turn) or a message list
            (the conversation so far); chosen / rejected are the reply (a string) or message lists starting with
            the assistant's turn. Without "prompt", two message lists share their common first messages as the
            prompt (the Anthropic HH layout). Pairs whose chosen and rejected are identical carry no signal: they
            are skipped and counted, not an error.
  unpaired  {"prompt", "completion", "label": bool} (KTO; True = desirable). Paired records also work for KTO:
            chosen becomes a desirable completion, rejected an undesirable one.

Each prompt + reply is rendered by the model's chat template (`tokenizer/chat.py`, as SFT does): the prompt is what
the template gives with add_generation_prompt, the reply's tokens (and its end-of-turn token) are scored. Rows
longer than `max_length` lose prompt tokens from the left first (a pair's prompt is cut the same for both rows,
down to half of max_length), then reply tokens from the right; both are counted. Collates give the batch layout of
`objectives/preference.py`: chosen rows then rejected rows, labels shifted with -100 outside the replies. RL prompt
records (a prompt and the fields the rewards read) are in `data/prompts.py`; reference log-probs are precomputed by
`objectives.preference.precompute_reference`.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..tokenizer.chat import ChatFormatError, check_messages, clip_messages, encode_chat, render, useful_chars
from ..splits import split_by_hash
from .readers import DataError, ReadStats, iter_records, replaced_note

log = logging.getLogger(__name__)

IGNORE = -100

__all__ = ["PreferenceData", "PreferenceStats", "PairRecord", "UnpairedRecord", "PairExample", "UnpairedExample",
           "read_pairs", "read_pair", "read_unpaired", "prompt_messages", "to_unpaired", "holdout", "tokenize_pairs",
           "tokenize_unpaired", "reply_rows", "PairCollate", "UnpairedCollate", "encode_reply", "scoring_text",
           "describe", "load_preference_data"]


@dataclass
class PreferenceData:
    """Preference records (JSONL / Parquet; see docs/formats.md) and how they become token rows."""

    train: list[str] = field(default_factory=list)
    """Training files, directories or globs: paired records (prompt, chosen, rejected); kto also reads unpaired."""
    validation: list[str] = field(default_factory=list)
    """Validation files; empty = hold out validation_fraction of train (by a stable hash of each prompt)."""
    validation_fraction: float = 0.1
    """Share of train held out for validation when no validation files are given."""
    max_length: int = 512
    """Longest row (prompt + reply) in tokens; longer ones lose prompt tokens from the left, then reply tokens."""
    system_prompt: str | None = None
    """System message put in front of prompts that have none."""

    def validate(self) -> None:
        if not self.train:
            raise ValueError("train: give at least one file of preference records")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), found {self.validation_fraction}")
        if self.max_length < 4:
            raise ValueError(f"max_length must be >= 4, found {self.max_length}")


@dataclass
class PreferenceStats:
    """What happened to the records on the way to examples (reported by the stages)."""

    records: int = 0
    identical: int = 0
    """Pairs whose chosen and rejected are the same (skipped: they carry no preference)."""
    first_identical: str | None = None
    truncated_prompt: int = 0
    """Examples whose prompt lost tokens on the left."""
    truncated_reply: int = 0
    """Examples with a reply cut on the right."""
    no_target: int = 0
    """Examples left without a scored reply token (skipped)."""
    clipped: int = 0
    """Records with a message far longer than max_length could use, cut before tokenizing (bounded memory)."""
    first_no_target: str | None = None
    formats: dict[str, int] = field(default_factory=dict)
    read: ReadStats = field(default_factory=ReadStats)
    """What reading found (undecodable bytes replaced)."""


Messages = list[dict[str, str]]


@dataclass
class PairRecord:
    """A preference pair as conversations: prompt messages and the two replies (assistant-first message lists)."""

    where: str
    prompt: Messages
    chosen: Messages
    rejected: Messages
    margin: float | None = None


@dataclass
class UnpairedRecord:
    """A prompt, one reply and whether it is desirable (KTO)."""

    where: str
    prompt: Messages
    completion: Messages
    label: bool


@dataclass
class PairExample:
    """A tokenized pair: the shared prompt, each reply with its mask of scored tokens, optional reference log-probs
    (summed over the scored tokens, filled by precomputation) and Bradley–Terry margin."""

    where: str
    prompt: list[int]
    chosen: list[int]
    chosen_mask: list[int]
    rejected: list[int]
    rejected_mask: list[int]
    margin: float | None = None
    ref_chosen: float | None = None
    ref_rejected: float | None = None


@dataclass
class UnpairedExample:
    """A tokenized KTO example and its mismatched pair (this prompt, another example's reply) for the KL estimate."""

    where: str
    prompt: list[int]
    completion: list[int]
    mask: list[int]
    label: bool
    kl_prompt: list[int]
    kl_completion: list[int]
    kl_mask: list[int]
    ref: float | None = None
    ref_kl: float | None = None


# ---- records -> conversations ----------------------------------------------------------------------------------

def _messages(value: Any, where: str, key: str) -> Messages:
    try:
        msgs = check_messages(value, f"{where}: {key!r}")
    except ChatFormatError as e:
        raise DataError(str(e)) from None
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _string_or_messages(record: dict[str, Any], key: str, where: str, role: str) -> Messages:
    if key not in record:
        found = ", ".join(map(repr, list(record)[:8])) or "none"
        raise DataError(f"{where}: missing {key!r} (found keys {found})")
    value = record[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {key!r} is empty, expected text")
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(value, where, key)
    raise DataError(f"{where}: {key!r} is {type(value).__name__} {str(value)[:40]!r}, expected a string or a list "
                    "of {\"role\", \"content\"} messages")


def prompt_messages(record: dict[str, Any], where: str, system_prompt: str | None = None) -> Messages:
    """A record's "prompt" (a string: one user turn; or a message list ending before the reply) as messages, with
    `system_prompt` put in front when it has no system message; DataError naming `where` otherwise."""
    msgs = _string_or_messages(record, "prompt", where, "user")
    if msgs[-1]["role"] == "assistant":
        raise DataError(f"{where}: 'prompt' ends with an assistant message; expected the conversation up to the "
                        "reply (ending with a user or tool message)")
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _reply(record: dict[str, Any], key: str, where: str) -> Messages:
    msgs = _string_or_messages(record, key, where, "assistant")
    return _check_reply(msgs, where, key)


def _check_reply(msgs: Messages, where: str, key: str) -> Messages:
    if msgs[0]["role"] != "assistant" or msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: {key!r} must start and end with an assistant message (the reply), found roles "
                        f"{[m['role'] for m in msgs]}")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: {key!r} message {i} is an empty assistant turn; expected the reply text")
    return msgs


def _margin(record: dict[str, Any], where: str) -> float | None:
    value = record.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: 'margin' is {type(value).__name__} {value!r}, expected a finite number")
    return float(value)


def read_pair(record: Any, where: str, system_prompt: str | None = None,
              stats: PreferenceStats | None = None) -> PairRecord:
    """One paired record (`prompt` + `chosen` + `rejected`, or two message lists sharing their first messages) as
    conversations; DataError naming `where` when it is not one."""
    return _pair(record, where, system_prompt, stats if stats is not None else PreferenceStats())


def _pair(record: Any, where: str, system_prompt: str | None, stats: PreferenceStats) -> PairRecord:
    if not isinstance(record, dict):
        raise DataError(f"{where}: found a JSON {type(record).__name__}, expected an object "
                        '{"prompt", "chosen", "rejected"}')
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        found = ", ".join(map(repr, list(record)[:8])) or "none"
        raise DataError(f"{where}: missing {', '.join(map(repr, missing))} (found keys {found}); expected a paired "
                        'record {"prompt", "chosen", "rejected"}')
    if "prompt" not in record and isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        chosen, rejected = _messages(record["chosen"], where, "chosen"), _messages(record["rejected"], where,
                                                                                   "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no first message to use as "
                            "one; give a 'prompt'")
        prompt = chosen[:n]
        if n == len(chosen) == len(rejected):  # identical conversations: the last turn is the (same) reply
            n -= 1
            prompt = chosen[:n]
        if system_prompt and prompt and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": system_prompt})
        kind = "paired (implicit prompt)"
        chosen, rejected = _check_reply(chosen[n:], where, "chosen"), _check_reply(rejected[n:], where, "rejected")
    else:
        prompt = prompt_messages(record, where, system_prompt)
        chosen, rejected = _reply(record, "chosen", where), _reply(record, "rejected", where)
        kind = "paired"
    stats.formats[kind] = stats.formats.get(kind, 0) + 1
    return PairRecord(where, prompt, chosen, rejected, _margin(record, where))


def _unpaired(record: Any, where: str, system_prompt: str | None) -> UnpairedRecord:
    if not isinstance(record, dict):
        raise DataError(f"{where}: found a JSON {type(record).__name__}, expected an object "
                        '{"prompt", "completion", "label"}')
    prompt = prompt_messages(record, where, system_prompt)
    completion = _reply(record, "completion", where)
    if "label" not in record:
        raise DataError(f"{where}: missing 'label'; expected true (desirable) or false (undesirable)")
    label = record["label"]
    if not isinstance(label, bool):
        raise DataError(f"{where}: 'label' is {type(label).__name__} {label!r}, expected true (desirable) or false "
                        "(undesirable)")
    return UnpairedRecord(where, prompt, completion, label)


def _identical(pair: PairRecord, stats: PreferenceStats) -> bool:
    if pair.chosen != pair.rejected:
        return False
    stats.identical += 1
    stats.first_identical = stats.first_identical or pair.where
    return True


def read_pairs(paths: str | Sequence[str], system_prompt: str | None = None,
               stats: PreferenceStats | None = None) -> list[PairRecord]:
    """Every paired record in `paths` as conversations (identical pairs skipped and counted)."""
    stats = stats if stats is not None else PreferenceStats()
    out = []
    for where, record in iter_records(paths, stats=stats.read):
        stats.records += 1
        pair = _pair(record, where, system_prompt, stats)
        if not _identical(pair, stats):
            out.append(pair)
    if not out:
        raise DataError(f"no usable preference pairs in {paths}")
    return out


def read_unpaired(paths: str | Sequence[str], system_prompt: str | None = None,
                  stats: PreferenceStats | None = None) -> list[UnpairedRecord]:
    """Every record in `paths` as unpaired examples: KTO records as they are, paired records as two (chosen
    desirable, rejected undesirable); a file may mix both."""
    stats = stats if stats is not None else PreferenceStats()
    out: list[UnpairedRecord] = []
    for where, record in iter_records(paths, stats=stats.read):
        stats.records += 1
        if isinstance(record, dict) and "completion" not in record and ("chosen" in record or "rejected" in record):
            pair = _pair(record, where, system_prompt, stats)
            if not _identical(pair, stats):
                out += to_unpaired([pair])
        else:
            out.append(_unpaired(record, where, system_prompt))
            stats.formats["unpaired"] = stats.formats.get("unpaired", 0) + 1
    if not out:
        raise DataError(f"no usable KTO examples in {paths}")
    return out


def to_unpaired(pairs: Sequence[PairRecord]) -> list[UnpairedRecord]:
    """Each pair as two KTO examples: the chosen reply desirable, the rejected one undesirable."""
    return [UnpairedRecord(p.where, p.prompt, reply, label)
            for p in pairs for reply, label in ((p.chosen, True), (p.rejected, False))]


def holdout(records: Sequence[Any], fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(train, validation) by a stable hash of each record's prompt: records sharing a prompt stay together."""
    return split_by_hash(records, lambda r: json.dumps(r.prompt, sort_keys=True), fraction, seed)


# ---- conversations -> tokens -----------------------------------------------------------------------------------

def _encode(tok, prompt: Messages, reply: Messages, where: str, limit: int | None = None,
            stats: PreferenceStats | None = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, reply ids, reply mask) of the rendered conversation: the prompt is the longest prefix of the
    conversation's tokens that the prompt alone (with the generation prompt) also gives; the reply runs to its
    last scored token (the end-of-turn token). With `limit` (`useful_chars`), longer prompt messages keep their
    end and longer replies their beginning, as `_fit` would, so a huge record is never tokenized whole."""
    if limit is not None:
        prompt, cut_prompt = clip_messages(prompt, limit, keep_end=True)
        reply, cut_reply = clip_messages(reply, limit)
        if stats is not None:
            stats.clipped += cut_prompt or cut_reply
    enc = encode_chat(tok, prompt + reply, include_end_of_turn=True)
    ptext = render(tok, prompt, add_generation_prompt=True)
    if not enc.text.startswith(ptext):
        raise DataError(f"{where}: the chat template renders the prompt (with the generation prompt) as "
                        f"{ptext[-60:]!r}, which is not how it renders the conversation with the reply; the "
                        "template cannot tell prompt from reply")
    pids = tok.backend.encode(ptext, add_special_tokens=False).ids
    split = 0
    while split < min(len(pids), len(enc.ids)) and pids[split] == enc.ids[split]:
        split += 1
    scored = [i for i in range(split, len(enc.ids)) if enc.assistant_mask[i]]
    end = scored[-1] + 1 if scored else split
    return enc.ids[:split], enc.ids[split:end], enc.assistant_mask[split:end]


def _fit(prompt: list[int], replies: list[tuple[list[int], list[int]]], max_length: int, close: bool,
         stats: PreferenceStats) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """Cut a prompt (from the left, shared by its replies, down to half of max_length) and then the replies (from
    the right) so that prompt + each reply fits `max_length`. With `close`, a cut reply keeps its last token (the
    end-of-turn token a reward head reads) in place of the last one that fits."""
    longest = max(len(r) for r, _ in replies)
    if len(prompt) + longest <= max_length:
        return prompt, replies
    keep = max(max_length - longest, min(len(prompt), max_length // 2))
    if keep < len(prompt):
        stats.truncated_prompt += 1
        prompt = prompt[len(prompt) - keep:]
    room = max_length - len(prompt)
    out = []
    for ids, mask in replies:
        if len(ids) > room:
            ids, mask = (ids[:room - 1] + ids[-1:], mask[:room - 1] + mask[-1:]) if close else (ids[:room],
                                                                                              mask[:room])
        out.append((ids, mask))
    if any(len(a) != len(b) for (a, _), (b, _) in zip(out, replies)):
        stats.truncated_reply += 1
    return prompt, out


def _no_target(where: str, stats: PreferenceStats) -> None:
    stats.no_target += 1
    stats.first_no_target = stats.first_no_target or where


def tokenize_pairs(pairs: Sequence[PairRecord], tok, max_length: int, stats: PreferenceStats | None = None,
                   close_truncated: bool = False) -> list[PairExample]:
    """Token rows of each pair (see the module docstring); `close_truncated` for reward models (see `_fit`)."""
    stats = stats if stats is not None else PreferenceStats()
    limit = useful_chars(tok, max_length)
    out = []
    for p in pairs:
        p_c, chosen, m_c = _encode(tok, p.prompt, p.chosen, p.where, limit, stats)
        p_r, rejected, m_r = _encode(tok, p.prompt, p.rejected, p.where, limit)
        n = 0  # the shared prompt: tokens at a template boundary may be merged differently in the two rows
        while n < min(len(p_c), len(p_r)) and p_c[n] == p_r[n]:
            n += 1
        prompt, ((chosen, m_c), (rejected, m_r)) = _fit(
            p_c[:n], [(p_c[n:] + chosen, [0] * (len(p_c) - n) + m_c), (p_r[n:] + rejected, [0] * (len(p_r) - n) + m_r)],
            max_length, close_truncated, stats)
        if not any(m_c) or not any(m_r):
            _no_target(p.where, stats)
        elif chosen == rejected:  # differed only after the cut
            stats.identical += 1
            stats.first_identical = stats.first_identical or p.where
        else:
            out.append(PairExample(p.where, prompt, chosen, m_c, rejected, m_r, p.margin))
    return out


def tokenize_unpaired(records: Sequence[UnpairedRecord], tok, max_length: int,
                      stats: PreferenceStats | None = None, seed: int = 0) -> list[UnpairedExample]:
    """Token rows of each KTO example and of its mismatched pair: the reply of the example before it in a seeded
    permutation (fixed here, so reference log-probs of the pairs can be precomputed)."""
    stats = stats if stats is not None else PreferenceStats()
    limit = useful_chars(tok, max_length)
    encoded = [_encode(tok, r.prompt, r.completion, r.where, limit, stats) for r in records]
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    partner = {order[j]: order[j - 1] for j in range(len(order))}
    out = []
    for i, r in enumerate(records):
        prompt, reply, mask = encoded[i]
        prompt, ((reply, mask),) = _fit(prompt, [(reply, mask)], max_length, False, stats)
        _, kl_reply, kl_mask = encoded[partner[i]]
        kl_prompt, ((kl_reply, kl_mask),) = _fit(encoded[i][0], [(kl_reply, kl_mask)], max_length, False,
                                                 PreferenceStats())
        if not any(mask) or not any(kl_mask):
            _no_target(r.where, stats)
            continue
        out.append(UnpairedExample(r.where, prompt, reply, mask, r.label, kl_prompt, kl_reply, kl_mask))
    return out


def encode_reply(tok, prompt: Messages, reply: str | Messages) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, reply ids, reply mask) of one prompt + reply as these stages build rows: the reply runs to its
    end-of-turn token, so `prompt + reply` is what a reward model trained here scores (pass an attention mask:
    the head reads the last real token, and the pad token may be the end-of-turn token)."""
    msgs = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
    return _encode(tok, prompt, msgs, "reply")


def scoring_text(tok, prompt: Messages, reply: str) -> str:
    """The text of a prompt + reply as a reward model trained here reads it, for `lmforge serve`'s /v1/classify
    (which appends the end-of-sequence token): the chat rendering up to the end of the reply."""
    convo = prompt + [{"role": "assistant", "content": reply}]
    text = render(tok, convo)
    for r in (reply, reply.strip()):  # a template may trim the content
        end = text.rfind(r)
        if end >= 0:
            return text[:end + len(r)]
    raise ValueError("the chat template does not reproduce the reply; cannot locate its end")


# ---- batches ---------------------------------------------------------------------------------------------------

def reply_rows(seqs: Sequence[tuple[list[int], list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of prompt + reply: input_ids, attention_mask and labels (B, T), `labels[:, t]` the next
    token where it is a scored reply token, else -100."""
    t = max(len(p) + len(r) for p, r, _ in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), t), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, (prompt, reply, mask) in enumerate(seqs):
        seq = torch.tensor(prompt + reply)
        n = len(seq)
        ids[i, :n] = seq
        attn[i, :n] = 1
        scored = torch.tensor([0] * len(prompt) + mask, dtype=torch.bool)[1:]  # (n - 1,) for tokens 1..n-1
        labels[i, :n - 1] = torch.where(scored, seq[1:], IGNORE)
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def _optional(items: Sequence[Any], attr: str, what: str) -> torch.Tensor | None:
    values = [getattr(x, attr) for x in items]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError(f"some examples of the batch have {what} and some do not; precompute them for all")
    return torch.tensor(values, dtype=torch.float32)


@dataclass
class PairCollate:
    """Paired batches: input_ids, labels, attention_mask (2B, T), chosen rows first; `margin` (B,) when any pair
    has one (0 for the others); ref_chosen_logps / ref_rejected_logps (B,) when precomputed."""

    pad_id: int

    def __call__(self, items: list[PairExample]) -> dict[str, torch.Tensor]:
        batch = reply_rows([(x.prompt, x.chosen, x.chosen_mask) for x in items]
                      + [(x.prompt, x.rejected, x.rejected_mask) for x in items], self.pad_id)
        if any(x.margin is not None for x in items):
            batch["margin"] = torch.tensor([x.margin or 0.0 for x in items], dtype=torch.float32)
        ref_c = _optional(items, "ref_chosen", "reference log-probs")
        if ref_c is not None:
            batch["ref_chosen_logps"] = ref_c
            batch["ref_rejected_logps"] = _optional(items, "ref_rejected", "reference log-probs")
        return batch


@dataclass
class UnpairedCollate:
    """KTO batches: input_ids, labels, attention_mask (N, T), label (N,) bool, the mismatched pairs as kl_input_ids,
    kl_labels, kl_attention_mask (N, T'), and ref_logps / ref_kl_logps (N,) when precomputed."""

    pad_id: int

    def __call__(self, items: list[UnpairedExample]) -> dict[str, torch.Tensor]:
        batch = reply_rows([(x.prompt, x.completion, x.mask) for x in items], self.pad_id)
        batch["label"] = torch.tensor([x.label for x in items], dtype=torch.bool)
        kl = reply_rows([(x.kl_prompt, x.kl_completion, x.kl_mask) for x in items], self.pad_id)
        batch.update({f"kl_{k}": v for k, v in kl.items()})
        ref = _optional(items, "ref", "reference log-probs")
        if ref is not None:
            batch["ref_logps"] = ref
            batch["ref_kl_logps"] = _optional(items, "ref_kl", "reference log-probs")
        return batch


def describe(stats: PreferenceStats, name: str) -> str:
    """One line for the log: records, formats, what was skipped or cut."""
    msg = f"{name}: {stats.records} records ({json.dumps(stats.formats)})"
    if stats.identical:
        msg += f"; {stats.identical} skipped with chosen identical to rejected (first: {stats.first_identical})"
    if stats.truncated_prompt or stats.truncated_reply:
        msg += f"; {stats.truncated_prompt} prompts cut on the left and {stats.truncated_reply} replies cut on the " \
               "right to max_length"
    if stats.no_target:
        msg += f"; {stats.no_target} skipped with no reply token left (first: {stats.first_no_target})"
    if stats.clipped:
        msg += f"; {stats.clipped} records with a message far longer than max_length clipped before tokenizing"
    if stats.read.replaced:
        msg += f"; {replaced_note(stats.read)}"
    return msg


def load_preference_data(d: PreferenceData, tok, seed: int = 0, *, unpaired: bool = False,
                         close_truncated: bool = False) -> tuple[list[Any], list[Any], str]:
    """(train examples, validation examples, a line for the log) of a stage's data section: pairs, or KTO examples
    with `unpaired`; validation from its own files or held out by prompt."""
    stats = PreferenceStats()
    read = read_unpaired if unpaired else read_pairs
    records = read(d.train, d.system_prompt, stats)
    if d.validation:
        val_records = read(d.validation, d.system_prompt, PreferenceStats())
    else:
        records, val_records = holdout(records, d.validation_fraction, seed)
    if unpaired:
        train: list[Any] = tokenize_unpaired(records, tok, d.max_length, stats, seed)
        val: list[Any] = tokenize_unpaired(val_records, tok, d.max_length, PreferenceStats(), seed)
    else:
        train = tokenize_pairs(records, tok, d.max_length, stats, close_truncated)
        val = tokenize_pairs(val_records, tok, d.max_length, PreferenceStats(), close_truncated)
    if not train:
        raise DataError(f"no training examples left in {d.train} ({describe(stats, 'data')})")
    return train, val, describe(stats, "preference data") + f"; {len(train)} train / {len(val)} validation examples"
