"""Exact dedup: documents whose normalised text is the same (case, Unicode form, punctuation and whitespace
ignored, as FineWeb's exact-substring normalisation) keep their first occurrence in corpus order."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from .base import Doc

__all__ = ["ExactDedupConfig", "ExactDedup", "normalise"]

_PUNCT_SPACE = re.compile(r"[\W_]+", re.UNICODE)


@dataclass
class ExactDedupConfig:
    """Exact dedup of normalised text."""

    normalise: bool = True
    """Compare NFKC-normalised, lower-cased text with punctuation and whitespace runs as one space; false: the
    exact bytes."""


def normalise(text: str) -> str:
    """NFKC, lower case, every run of punctuation / whitespace as one space, trimmed."""
    return _PUNCT_SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


class ExactDedup:
    """A CorpusStep: one 64-bit BLAKE2b hash of each document's (normalised) text."""

    name = "exact_dedup"

    def __init__(self, cfg: ExactDedupConfig):
        self.cfg = cfg

    def keys(self, docs: list[Doc]) -> np.ndarray:
        out = np.empty((len(docs), 1), dtype=np.uint64)  # [n, 1]
        for i, d in enumerate(docs):
            text = normalise(d.text) if self.cfg.normalise else d.text
            digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            out[i, 0] = int.from_bytes(digest, "little")
        return out

    def duplicates(self, doc_keys: list[str], keys: np.ndarray) -> dict[str, tuple[str, str]]:
        first: dict[int, str] = {}
        out: dict[str, tuple[str, str]] = {}
        for key, h in zip(doc_keys, keys[:, 0].tolist()):
            if h in first:
                out[key] = ("duplicate", first[h])
            else:
                first[h] = key
        return out
