"""Word n-grams as benchmark decontamination sees them: lm-eval's normalisation, 64-bit n-gram hashes and a sorted
set of task n-gram hashes that a stream of corpus n-grams is tested against. One copy for both users: the
contamination report of `lmforge evaluate` (eval/contamination.py) and the `decontaminate` curation step.

Normalisation is lm-evaluation-harness's Janitor (`lm_eval/decontamination/janitor.py`, `Janitor.normalize_string`
+ `word_ngrams`): ASCII letters lowercased, ASCII punctuation (`string.punctuation`) deleted (so "don't" is
"dont"), then split on whitespace as `str.split()` does. N = 13 as GPT-3 (Brown et al. 2020, Appendix C).

Hashes are random per unit (Python's keyed SipHash of a word, stable within one process only) combined by a
polynomial mod 2**64 with an odd multiplier, so two different n-grams collide with probability about 2**-64.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

__all__ = ["NGRAM", "UNICODE_SPACES", "normalize_bytes", "normalized_words", "word_hashes", "window_hashes",
           "NgramSet"]

NGRAM = 13
"""Default n-gram length in words or tokens (GPT-3 Appendix C, lm-eval decontamination)."""

_P = np.uint64(0x9E3779B97F4A7C15)  # odd: invertible mod 2**64, so a changed unit always changes the hash
# str.split() also splits on \x1c-\x1f and these non-ASCII spaces, bytes.split() does not: map them to b" "
_LOWER = bytes.maketrans(string.ascii_uppercase.encode() + b"\x1c\x1d\x1e\x1f",
                         string.ascii_lowercase.encode() + b"    ")
_PUNCT = string.punctuation.encode()
UNICODE_SPACES = "\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
                 "\u2028\u2029\u202f\u205f\u3000"
"""The non-ASCII characters `str.split()` splits on."""
_UNICODE_SPACE_RE = re.compile(b"|".join(re.escape(c.encode()) for c in UNICODE_SPACES))


def normalize_bytes(data: bytes) -> list[bytes]:
    """Words of UTF-8 `data` after lm-eval's normalisation (see the module docstring)."""
    if not data.isascii():
        data = _UNICODE_SPACE_RE.sub(b" ", data)
    return data.translate(_LOWER, _PUNCT).split()


def normalized_words(text: str) -> list[str]:
    """The words of `text` as word n-grams see them: ASCII-lowercased, ASCII punctuation deleted, split on
    whitespace (lm-eval's Janitor normalisation)."""
    return [w.decode("utf-8", "surrogatepass") for w in normalize_bytes(text.encode("utf-8", "surrogatepass"))]


def word_hashes(words: list[bytes]) -> np.ndarray:
    """(len(words),) uint64: Python's keyed 64-bit hash of each word (stable within this process)."""
    return np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)


def window_hashes(m: np.ndarray, n: int) -> np.ndarray:
    """(max(0, L - n + 1),) uint64 hash of every n-gram of the unit hashes `m` (L,): sum m[i+k] * P**(n-1-k)."""
    w = len(m) - n + 1
    if w <= 0:
        return np.empty(0, np.uint64)
    acc = m[:w].copy()
    for k in range(1, n):  # Horner over the window, vectorised across all windows; uint64 wraps mod 2**64
        acc *= _P
        acc += m[k:k + w]
    return acc


class NgramSet:
    """The sorted unique task n-gram hashes, with a bitmap on their top bits so most corpus n-grams are rejected
    by one gather before the binary search."""

    def __init__(self, hashes: Sequence[np.ndarray]) -> None:
        self.keys = np.unique(np.concatenate(list(hashes))) if len(hashes) else np.empty(0, np.uint64)
        bits = int(np.clip(np.ceil(np.log2(max(len(self.keys), 1))) + 4, 16, 26))  # ~1/16 false candidates
        self.shift = np.uint64(64 - bits)
        self.bitmap = np.zeros(1 << bits, bool)
        self.bitmap[self.keys >> self.shift] = True

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, h: np.ndarray) -> np.ndarray:
        """Positions in `h` whose hash is a task n-gram hash."""
        cand = np.flatnonzero(self.bitmap[h >> self.shift])
        if len(cand) == 0:
            return cand
        hc = h[cand]
        j = np.minimum(np.searchsorted(self.keys, hc), len(self.keys) - 1)
        return cand[self.keys[j] == hc]
