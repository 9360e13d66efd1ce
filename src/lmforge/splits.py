"""Stable hash splits: which documents are held out (validation, decontamination samples) depends only on their
key and a seed, never on order or on the machine. Floor 0: imports nothing of lmforge."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

__all__ = ["in_fraction", "split_by_hash"]


def in_fraction(key: str, fraction: float, seed: int = 0) -> bool:
    """Stable pseudo-random membership of a document key (its id, else its text) in a fraction of the corpus."""
    if fraction <= 0:
        return False
    h = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, salt=seed.to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") < fraction * 2**64


def split_by_hash(items: Sequence[Any], key, fraction: float, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """(kept, held out): each item is held out by `in_fraction(key(item))`, so the split is stable and does not
    depend on order (identical keys never straddle it)."""
    kept: list[Any] = []
    held: list[Any] = []
    for it in items:
        (held if in_fraction(key(it), fraction, seed) else kept).append(it)
    return kept, held
