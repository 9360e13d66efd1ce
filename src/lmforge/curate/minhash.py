"""Near dedup by MinHash LSH: documents whose word 5-gram sets are similar (Jaccard) keep their first occurrence.

MinHash (Broder 1997, "On the resemblance and containment of documents"): for a random permutation h of shingle
hashes, P[min h(A) = min h(B)] = J(A, B) = |A ∩ B| / |A ∪ B|. LSH banding (Leskovec, Rajaraman & Ullman, "Mining of
Massive Datasets", ch. 3): the b·r minimums are cut into b bands of r rows and two documents become candidates when
all r rows of any band agree, so for Jaccard similarity s

    P(candidate) = 1 − (1 − s^r)^b

an S-curve around s ≈ (1/b)^(1/r). Defaults as datatrove / FineWeb: 5-word shingles, b = 14 bands x r = 8 rows
(112 permutations; threshold ≈ 0.72: P = 0.05 at s = 0.5, 0.56 at 0.7, 0.92 at 0.8, 0.9996 at 0.9).
Candidates are joined with union-find (A~B and B~C make one cluster) and every member of a cluster but the first in
corpus order is removed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .base import Doc
from .exact import normalise

__all__ = ["NearDedupConfig", "NearDedup", "candidate_probability"]

MERSENNE = (1 << 61) - 1
"""p of the permutations h_i(x) = (a_i·x + b_i) mod p (a Mersenne prime: mod p is two shifts and an add)."""
NO_WORDS = np.uint64(0)
"""The band hash of a document with no words (never a candidate); real band hashes are never 0."""

_P = np.uint64(MERSENNE)
_61 = np.uint64(61)
_33 = np.uint64(33)
_K = np.uint64(0x9E3779B97F4A7C15)  # odd: x -> x * K is a bijection mod 2^64 (golden-ratio constant)
_CHUNK = 1024  # shingles per permutation block: [perm, chunk] uint64 stays in the L2 cache


@dataclass
class NearDedupConfig:
    """MinHash LSH near dedup (P(candidate) = 1 − (1 − s^rows)^bands for Jaccard similarity s)."""

    shingle: int = 5
    """Words per shingle (word n-gram) of the normalised text; a document with fewer words is one shingle."""
    bands: int = 18
    """LSH bands: two documents are candidates when all rows of any band agree (more bands: higher recall)."""
    rows: int = 6
    """MinHash rows per band (more rows: a sharper, higher threshold); bands x rows permutations in all. 18 x 6
    catches a pair of Jaccard 0.77 (3% word edits) with P = 0.985; datatrove / FineWeb's 14 x 8 with 0.84."""
    seed: int = 1
    """Seed of the permutations' coefficients (the same on every worker)."""

    def validate(self) -> None:
        for name in ("shingle", "bands", "rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"near_dedup.{name} must be an integer >= 1, got {value!r}")
        if self.bands * self.rows > 4096:
            raise ValueError(f"near_dedup.bands x rows must be at most 4096 permutations, got "
                             f"{self.bands} x {self.rows} = {self.bands * self.rows}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"near_dedup.seed must be an integer in [0, 2^32), got {self.seed!r}")


def candidate_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two documents of Jaccard `similarity` share a bucket) = 1 − (1 − s^rows)^bands."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place: every output bit depends on every input bit."""
    h ^= h >> _33
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> _33
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> _33
    return h


class _WordHashes(dict):
    """word -> its 64-bit BLAKE2b hash, computed once per distinct word (stable across processes, unlike hash())."""

    def __missing__(self, word: str) -> int:
        h = int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        self[word] = h
        return h


class NearDedup:
    """A CorpusStep: `keys` gives each document `bands` LSH band hashes of its MinHash signature (vectorised over
    the whole partition); `duplicates` buckets them by (band, hash), joins documents sharing a bucket with
    union-find, and removes all but the first of each cluster in corpus order. A document's keys depend on its text
    alone, so the result is the same however the corpus is partitioned."""

    name = "near_dedup"

    def __init__(self, cfg: NearDedupConfig):
        cfg.validate()
        self.cfg = cfg
        n = cfg.bands * cfg.rows
        gen = np.random.RandomState(cfg.seed)  # the legacy generator: its stream never changes between numpy versions
        self._a = gen.randint(1, MERSENNE, size=(n, 1), dtype=np.uint64)  # [perm, 1]
        self._b = gen.randint(0, MERSENNE, size=(n, 1), dtype=np.uint64)  # [perm, 1]
        self._words = _WordHashes()

    # ---- per partition ------------------------------------------------------------------------------------------

    def shingles(self, docs: list[Doc]) -> tuple[np.ndarray, np.ndarray]:
        """(hashes [S] uint64 of every document's shingles, in order; shingles per document [n] int64). A shingle
        hash mixes the BLAKE2b hashes of its `shingle` words (order matters); each word is hashed once."""
        if len(self._words) > 1 << 19:  # a bound on the cache (~60 MB); hashes are recomputed identically
            self._words.clear()
        n = self.cfg.shingle
        texts = [normalise(d.text) for d in docs]
        counts = np.fromiter((t.count(" ") + 1 if t else 0 for t in texts), dtype=np.int64, count=len(texts))
        joined = " ".join(t for t in texts if t)
        words = joined.split(" ") if joined else []
        w = np.zeros(len(words) + n, dtype=np.uint64)  # [T + n]: zero padding past the last word
        w[: len(words)] = np.fromiter(map(self._words.__getitem__, words), dtype=np.uint64, count=len(words))
        per_doc = np.where(counts >= n, counts - n + 1, np.minimum(counts, 1))  # [n]
        offsets = np.cumsum(counts) - counts
        total = int(per_doc.sum())
        first = np.cumsum(per_doc) - per_doc
        starts = np.arange(total, dtype=np.int64) + np.repeat(offsets - first, per_doc)  # [S] first word of each
        limit = np.repeat(offsets + counts, per_doc) if bool(((counts > 0) & (counts < n)).any()) else None
        h = np.zeros(total, dtype=np.uint64)
        for k in range(n):
            v = w[starts + k]
            if limit is not None:
                v[starts + k >= limit] = 0  # a short document's one shingle: its words only
            h ^= v
            h *= _K
        return _fmix64(h), per_doc

    def signatures(self, docs: list[Doc]) -> np.ndarray:
        """[n, bands·rows] uint64: min over the document's shingles x of h_i(x) = (a_i·x + b_i) mod p, p = 2^61 − 1
        (the product wraps at 2^64 first, as in datatrove; mod p by the Mersenne reduction). A document with no
        words has the all-ones row (no real minimum is that large)."""
        x_all, per_doc = self.shingles(docs)
        sig = np.full((len(docs), self._a.shape[0]), np.iinfo(np.uint64).max, dtype=np.uint64)
        idx = np.flatnonzero(per_doc)
        ends = np.cumsum(per_doc[idx])
        begins = ends - per_doc[idx]
        i = 0
        while i < len(idx):  # blocks of whole documents of about _CHUNK shingles: [perm, chunk] at a time
            j = max(int(np.searchsorted(ends, begins[i] + _CHUNK, side="right")), i + 1)
            y = np.multiply(self._a, x_all[None, begins[i]:ends[j - 1]])  # [perm, chunk], wraps mod 2^64
            y += self._b
            hi = y >> _61
            y &= _P
            y += hi  # ≡ y mod p, in [0, p + 7]
            np.minimum(y, y - _P, out=y)  # subtract p where y >= p (else y - p wraps to a larger number)
            sig[idx[i:j]] = np.minimum.reduceat(y, begins[i:j] - begins[i], axis=1).T
            i = j
        return sig

    def keys(self, docs: list[Doc]) -> np.ndarray:
        """[n, bands] uint64: a 64-bit hash of each band's `rows` minimums (0 for a document with no words)."""
        sig = self.signatures(docs).reshape(len(docs), self.cfg.bands, self.cfg.rows)
        h = np.full((len(docs), self.cfg.bands), np.uint64(self.cfg.rows), dtype=np.uint64)
        for r in range(self.cfg.rows):
            h ^= sig[:, :, r]
            h *= _K
            _fmix64(h)
        h[h == NO_WORDS] = 1
        h[sig[:, 0, 0] == np.iinfo(np.uint64).max] = NO_WORDS
        return h

    # ---- over the corpus ----------------------------------------------------------------------------------------

    def clusters(self, keys: np.ndarray) -> np.ndarray:
        """[N] int64: for each row, the first row (corpus order) of its cluster: rows sharing a (band, hash) bucket
        are joined, transitively (union-find: roots hooked onto the smaller root, then pointer jumping)."""
        n = keys.shape[0]
        root = np.arange(n, dtype=np.int64)
        us, vs = [], []
        for band in range(keys.shape[1]):
            _, first, inverse = np.unique(keys[:, band], return_index=True, return_inverse=True)
            f = first[inverse.reshape(-1)]  # the bucket's first row (np.unique's index is the first occurrence)
            edge = (f != np.arange(n)) & (keys[:, band] != NO_WORDS)
            us.append(np.flatnonzero(edge))
            vs.append(f[edge])
        u, v = np.concatenate(us), np.concatenate(vs)
        while u.size:
            ru, rv = root[u], root[v]
            hi, lo = np.maximum(ru, rv), np.minimum(ru, rv)
            live = hi != lo
            if not live.any():
                break
            u, v, hi, lo = u[live], v[live], hi[live], lo[live]
            np.minimum.at(root, hi, lo)  # hi is a root: hook it onto the smallest root it meets
            while True:  # compress: every row points at its root (roots are the smallest row of their tree)
                nxt = root[root]
                if np.array_equal(nxt, root):
                    break
                root = nxt
        return root

    def duplicates(self, doc_keys: list[str], keys: np.ndarray) -> dict[str, tuple[str, str]]:
        if len(doc_keys) != keys.shape[0]:
            raise ValueError(f"near_dedup: {len(doc_keys)} document keys for {keys.shape[0]} rows of keys")
        if not doc_keys:
            return {}
        if keys.shape[1] != self.cfg.bands:
            raise ValueError(f"near_dedup: keys have {keys.shape[1]} bands, the config {self.cfg.bands}")
        root = self.clusters(keys)
        return {doc_keys[i]: ("near_duplicate", doc_keys[r]) for i, r in enumerate(root.tolist()) if r != i}
