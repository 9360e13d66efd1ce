"""RL prompt data for `lmforge ppo` and `lmforge grpo`: JSONL / Parquet records {"prompt", …any fields the reward
functions read}. The prompt is a string (one user turn) or a message list (the conversation so far); every other
field is kept for the rewards (e.g. "answer", "tests"). Validation prompts come from their own files or are held
out by a stable hash of each prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from ..splits import split_by_hash
from .preference import prompt_messages
from .readers import DataError, iter_records

__all__ = ["PromptData", "RESERVED", "RecordChecker", "read_prompts", "load_prompt_data"]

RESERVED = ("messages", "where")
"""Keys `read_prompts` adds to each prompt record (a record may not carry them itself)."""


@dataclass
class PromptData:
    """RL prompts: JSONL / Parquet records {"prompt", …fields the rewards read}; the prompt is a string (one user
    turn) or a message list."""

    train: list[str] = field(default_factory=list)
    """Training prompt files, directories or globs."""
    validation: list[str] = field(default_factory=list)
    """Held-out prompt files; empty = hold out validation_fraction of train (a stable hash of each prompt)."""
    validation_fraction: float = 0.1
    """Share of train held out when no validation files are given."""
    eval_limit: int | None = 64
    """Held-out prompts answered at each evaluation (None = all)."""
    chat: bool = True
    """Render prompts with the model's chat template (false: a string prompt as it is)."""
    system_prompt: str | None = None
    """System message put in front of prompts that have none."""
    max_prompt_length: int = 512
    """Longest prompt in tokens; longer ones lose their beginning."""

    def validate(self) -> None:
        if not self.train:
            raise ValueError("train: give at least one file of prompt records")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), found {self.validation_fraction}")
        if self.max_prompt_length < 1 or (self.eval_limit is not None and self.eval_limit < 1):
            raise ValueError("max_prompt_length and eval_limit must be >= 1")


class RecordChecker(Protocol):
    """What checks prompt records against the fields it reads (`rl.rewards.Rewards`)."""

    def check_records(self, records: Sequence[tuple[str, dict[str, Any]]]) -> None:
        ...


def read_prompts(paths: str | Sequence[str], system_prompt: str | None = None) -> list[dict[str, Any]]:
    """RL prompt records: each record with all its fields (what reward functions read, e.g. "answer", "tests"),
    plus "messages" (the prompt as a conversation, for the chat template) and "where" (file:line)."""
    out = []
    for where, record in iter_records(paths):
        if not isinstance(record, dict):
            raise DataError(f"{where}: found a JSON {type(record).__name__}, expected an object "
                            '{"prompt", ...fields the reward functions read}')
        taken = [k for k in RESERVED if k in record]
        if taken:
            raise DataError(f"{where}: field {taken[0]!r} is reserved in prompt records (it is filled with the "
                            f"prompt's {'conversation' if taken[0] == 'messages' else 'file:line'}); rename it")
        out.append({**record, "messages": prompt_messages(record, where, system_prompt), "where": where})
    if not out:
        raise DataError(f"no prompt records in {paths}")
    return out


def load_prompt_data(d: PromptData, rewards: RecordChecker, seed: int = 0
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train records, validation records, data fingerprint) of an RL stage's prompts, checked against the fields
    its rewards read (`rl.rewards.Rewards.check_records`)."""
    train = read_prompts(d.train, d.system_prompt)
    if d.validation:
        val = read_prompts(d.validation, d.system_prompt)
    else:
        train, val = split_by_hash(train, lambda r: json.dumps(r["prompt"], sort_keys=True), d.validation_fraction,
                                   seed)
    if not train or not val:
        raise DataError(f"{len(train)} training and {len(val)} validation prompts: both need at least one (add "
                        "data.validation files or change data.validation_fraction)")
    val = val[:d.eval_limit]
    rewards.check_records([(r["where"], r) for r in train + val])
    digest = hashlib.sha256(json.dumps([r["prompt"] for r in train + val], sort_keys=True).encode()).hexdigest()
    return train, val, digest[:16]
