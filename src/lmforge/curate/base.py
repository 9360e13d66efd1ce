"""What a curation step sees and returns. Two kinds of step, as in datatrove / NeMo Curator:

- a `Filter` looks at each document on its own (language, quality rules, PII, toxicity, perplexity,
  decontamination). It runs where the documents are (one partition at a time, in a worker process) and returns one
  `Verdict` per document: None keeps it, a string removes it and names the rule (`"gopher:too_few_words"`).
  It may rewrite a kept document's text (PII redaction) and adds its scores to `meta`.
- a `CorpusStep` needs every document (exact and near dedup; a quantile cut of scores). `keys` runs per partition
  and returns a small key per document (a row of uint64, saved with numpy, no pickle); `duplicates` runs once over
  the keys of all partitions, in the order of the corpus, and names the documents to remove (a dedup keeps the first
  of each cluster in corpus order), so the result does not depend on how the corpus was split or on which worker
  ran what.

Steps are built in each worker from their config (a dataclass, so it pickles) by `build(cfg)` in their module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Doc", "Verdict", "Filter", "CorpusStep", "Counts"]

Verdict = str | None
"""None keeps the document; a string removes it and is the reason: the rule that fired (counted per step)."""


@dataclass
class Doc:
    """A document as curation sees it: `key` is unique in the corpus (its `file:line`), `id` the record's own id
    (or the key), `meta` the record's metadata plus what steps add (language, scores)."""

    key: str
    text: str
    id: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Counts:
    """What a step did to one partition (summed over partitions into curate.json)."""

    docs_in: int = 0
    bytes_in: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)
    """Removed documents by reason."""
    extra: dict[str, int] = field(default_factory=dict)
    """Step-specific counters (e.g. PII replacements per entity type)."""
    seconds: float = 0.0

    def add(self, other: "Counts") -> None:
        self.docs_in += other.docs_in
        self.bytes_in += other.bytes_in
        self.kept += other.kept
        self.seconds += other.seconds
        for mine, theirs in ((self.removed, other.removed), (self.extra, other.extra)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


@runtime_checkable
class Filter(Protocol):
    """A per-document step; `extra()` returns its own counters for the partition just processed (may be empty)."""

    name: str

    def __call__(self, docs: list[Doc]) -> list[Verdict]:
        ...

    def extra(self) -> dict[str, int]:
        ...


@runtime_checkable
class CorpusStep(Protocol):
    """A corpus-wide step: per-partition keys, then one pass over all of them (in corpus order)."""

    name: str

    def keys(self, docs: list[Doc]) -> np.ndarray:
        """[n, k] uint64: the document's key (exact: one hash; MinHash: one hash per LSH band)."""
        ...

    def duplicates(self, doc_keys: list[str], keys: np.ndarray) -> dict[str, tuple[str, str]]:
        """doc key -> (reason, a related document's key or "") for every document to remove; `doc_keys[i]` owns row i
        of `keys` [N, k], in corpus order. A dedup names the document kept in its place (the first of its
        cluster)."""
        ...
