"""Benchmark contamination: per task, the share of examples that share an n-gram (13 by default) with a training
corpus (documents) or with token shards written by `lmforge prepare`.

Definition from GPT-3 (Brown et al. 2020, "Language Models are Few-Shot Learners", Appendix C), as
lm-evaluation-harness applies it (docs/decontamination.md, N = 13): an example is contaminated when any of its
n-grams occurs anywhere in the corpus. Word n-grams use lm-eval's Janitor normalisation
(`lm_eval/decontamination/janitor.py`, `Janitor.normalize_string` + `word_ngrams`): ASCII letters lowercased,
ASCII punctuation (`string.punctuation`) deleted (so "don't" is "dont"), then split on whitespace as `str.split()`
does. Token n-grams compare token ids, the task texts encoded as `prepare` encoded the shards.

Method: the task n-grams (small) are hashed into a sorted 64-bit set first; the corpus is then streamed once and
every corpus n-gram hash is tested against it, vectorised with numpy. Hashes are random per unit (Python's keyed
SipHash of a word; a seeded random table per token id) combined by a polynomial mod 2**64 with an odd
multiplier, so two different n-grams collide with probability about 2**-64: over 1e9 corpus n-grams against 1e6
task n-grams the expected number of false matches is about 5e-5. Every matched hash is moreover checked for exact
equality against its first corpus occurrence, so a reported match is verified text, not only a hash (a true match
whose hash first met a colliding corpus n-gram would be missed: again about 2**-64 per pair). The normalisation,
the hashes and the task n-gram set live in `data/ngrams.py`, shared with the `decontaminate` curation step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.ngrams import NGRAM, normalized_words
from ..data.ngrams import UNICODE_SPACES as _UNICODE_SPACES  # noqa: F401  (the characters words split on)
from ..data.ngrams import NgramSet as _NgramSet
from ..data.ngrams import normalize_bytes as _normalize
from ..data.ngrams import window_hashes as _window_hashes
from ..data.ngrams import word_hashes as _word_hashes  # a module global, looked up at call time (tests swap it)
from ..data.readers import expand_placeholders, iter_documents
from ..data.shards import FORMAT as SHARDS_FORMAT
from ..data.shards import open_split, read_index

__all__ = ["NGRAM", "contamination", "normalized_words", "is_shards"]

MAX_REPORTED = 10
"""How many contaminated example indices a task lists."""

_GLOB_CHARS = set("*?[")
_SEP = b"\xff"  # never in UTF-8, so a "word" no task holds: n-grams across a document boundary cannot match
_ASCII_SPACE = (b" ", b"\n", b"\t", b"\r", b"\x0b", b"\x0c")


class _Matches:
    """First corpus occurrence (where, units) of every distinct task n-gram hash seen in the corpus."""

    def __init__(self) -> None:
        self.first: dict[int, tuple[str, tuple]] = {}
        self.hits = 0

    def add(self, h: np.ndarray, pos: np.ndarray, units: Callable[[np.ndarray], list[tuple]],
            where: Callable[[np.ndarray], list[str]]) -> None:
        """Record the matches at positions `pos` of the window hashes `h`; `units` and `where` read the n-grams at
        an array of positions from the corpus (called only for hashes not seen before)."""
        self.hits += len(pos)
        keys, first = np.unique(h[pos], return_index=True)  # distinct hashes, each at its first position
        new = np.array([k not in self.first for k in keys.tolist()], bool)
        if new.any():
            at = pos[first[new]]
            self.first.update(zip(keys[new].tolist(), zip(where(at), units(at))))


# ----------------------------------------------------------------------------- corpus: documents

def _segments(docs: Iterator, n: int, max_bytes: int) -> Iterator[tuple[list[bytes], str, int, int, bool]]:
    """(words, source, bytes read, words read, starts a document) per document; a document over `max_bytes` is cut at
    whitespace into pieces, each prefixed with the previous piece's last n-1 words so no n-gram is lost."""
    for doc in docs:
        data = doc.text.encode("utf-8", "surrogatepass")
        if len(data) <= max_bytes:
            words = _normalize(data)
            yield words, doc.source, len(data), len(words), True
            continue
        carry: list[bytes] = []
        start = 0
        while start < len(data):
            end = min(start + max_bytes, len(data))
            if end < len(data):  # cut after ASCII whitespace (a word boundary, never inside UTF-8): the last one
                cut = max(data.rfind(c, start, end) for c in _ASCII_SPACE)  # before end, else the first after it
                if cut < start:
                    cut = min((i for i in (data.find(c, end) for c in _ASCII_SPACE) if i >= 0), default=len(data))
                end = min(cut + 1, len(data))
            words = carry + _normalize(data[start:end])
            yield words, doc.source, end - start, len(words) - len(carry), start == 0
            carry = words[max(0, len(words) - (n - 1)):] if n > 1 else []
            start = end


def _scan_documents(paths: Any, ngrams: _NgramSet, n: int, matches: _Matches, stats: dict[str, Any], *,
                    include: Sequence[str] | None, exclude: Sequence[str], text_key: str, chunk_bytes: int,
                    show_progress: bool) -> None:
    """Stream the documents of `paths` in batches of about `chunk_bytes` and record their task n-gram matches."""
    from ..progress import progress

    sep = _word_hashes([_SEP])
    batch: list[tuple[list[bytes], str]] = []
    size = 0

    def flush() -> None:
        parts: list[np.ndarray] = []
        for words, _ in batch:
            parts += [_word_hashes(words), sep]
        m = np.concatenate(parts)  # (words of all segments + one separator after each,)
        starts = np.cumsum([0] + [len(w) + 1 for w, _ in batch[:-1]])  # (segments,) first word of each
        h = _window_hashes(m, n)
        stats["ngrams"] += len(h)
        pos = ngrams.find(h)
        if len(pos):
            def units(at: np.ndarray) -> list[tuple]:
                seg = np.searchsorted(starts, at, side="right") - 1
                return [tuple(batch[s][0][i:i + n]) for s, i in zip(seg.tolist(), (at - starts[seg]).tolist())]

            def where(at: np.ndarray) -> list[str]:
                return [batch[s][1] for s in (np.searchsorted(starts, at, side="right") - 1).tolist()]

            matches.add(h, pos, units, where)

    with progress(None, "contamination", unit="docs", enabled=show_progress) as bar:
        docs = iter_documents(paths, text_key, include, exclude)
        for words, source, nbytes, nwords, first in _segments(docs, n, chunk_bytes):
            batch.append((words, source))
            size += nbytes
            stats["bytes"] += nbytes
            stats["words"] += nwords
            if first:
                stats["documents"] += 1
                bar.advance(1, MB=round(stats["bytes"] / 1e6, 1))
            if size >= chunk_bytes:
                flush()
                batch, size = [], 0
        if batch:
            flush()


# ----------------------------------------------------------------------------- corpus: token shards

def is_shards(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder of token shards (an ``index.json`` of format ``lmforge-shards/1``)."""
    p = Path(path)
    if not (p / "index.json").is_file():
        return False
    try:
        return json.loads((p / "index.json").read_text(encoding="utf-8")).get("format") == SHARDS_FORMAT
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return False


def _shard_tokenizer(path: Path, index: dict[str, Any], tokenizer: Any) -> Any:
    """The tokenizer to encode the tasks with: the given one (a Tokenizer or its folder), else the one the index
    names; its fingerprint must be the shards' (else the ids mean other text)."""
    from ..tokenizer import Tokenizer

    info = index.get("tokenizer", {})
    want = info.get("fingerprint")
    if tokenizer is None:
        saved = info.get("path")
        if not saved or not (Path(saved) / "tokenizer.json").exists():
            raise ValueError(f"token shards {path} need the tokenizer they were prepared with (fingerprint {want}, "
                             f"path {saved!r} not found): pass tokenizer=")
        tokenizer = saved
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_dir(tokenizer)
    got = tokenizer.fingerprint()
    if got != want:
        raise ValueError(f"tokenizer mismatch: token shards {path} were prepared with tokenizer fingerprint {want} "
                         f"({info.get('path') or 'path not recorded'}), the given tokenizer has fingerprint {got}; "
                         f"token n-grams only compare under the same tokenizer")
    return tokenizer


def _shard_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """Encode texts as `prepare` encoded the shards: no special tokens added, special-token text kept as text."""
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tokenizer.backend.to_str())  # a copy: the caller's tokenizer is left as it is
    backend.encode_special_tokens = True
    backend.no_padding()
    backend.no_truncation()
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in encode(list(texts), add_special_tokens=False)]


def _token_table(vocab_size: int) -> np.ndarray:
    """(vocab_size,) uint64 random hash per token id, seeded: the same on every run."""
    return np.random.default_rng(0x13).integers(0, 2**64 - 1, size=vocab_size, dtype=np.uint64, endpoint=True)


def _scan_shards(path: Path, index: dict[str, Any], table: np.ndarray, ngrams: _NgramSet, n: int, matches: _Matches,
                 stats: dict[str, Any], *, chunk_tokens: int, show_progress: bool) -> None:
    """Stream every split of the shards in chunks of `chunk_tokens` (n-1 tokens overlap between chunks and shards:
    a split is one token stream) and record their task n-gram matches."""
    from ..progress import progress

    total = sum(int(s.get("tokens", 0)) for s in index["splits"].values())
    with progress(total, "contamination", unit="tokens", enabled=show_progress) as bar:
        for split, entry in index["splits"].items():
            maps = open_split(path, split)
            names = [str(path / s["file"]) for s in entry["shards"]]
            file_starts = np.cumsum([0] + [len(mm) for mm in maps[:-1]])  # (shards,) split offset of each file
            carry = np.empty(0, np.int64)
            base = 0  # split offset of carry[0]
            for mm in maps:
                for a in range(0, len(mm), chunk_tokens):
                    toks = np.concatenate([carry, mm[a:a + chunk_tokens].astype(np.int64)])  # (carry + chunk,)
                    h = _window_hashes(table[toks], n)
                    stats["ngrams"] += len(h)
                    pos = ngrams.find(h)
                    if len(pos):
                        def where(at: np.ndarray, base: int = base) -> list[str]:
                            g = at + base  # (k,) offsets in the split
                            f = np.searchsorted(file_starts, g, side="right") - 1
                            return [f"{names[i]}:token {o}" for i, o in zip(f.tolist(), (g - file_starts[f]).tolist())]

                        def units(at: np.ndarray, t: np.ndarray = toks) -> list[tuple]:
                            return list(map(tuple, t[at[:, None] + np.arange(n)].tolist()))  # (k, n) windows

                        matches.add(h, pos, units, where)
                    keep = min(n - 1, len(toks))
                    base += len(toks) - keep
                    carry = toks[len(toks) - keep:]
                    done = min(chunk_tokens, len(mm) - a)
                    stats["tokens"] += done
                    bar.advance(done)


# ----------------------------------------------------------------------------- the check

def _check_corpus(corpus: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[str, Any]:
    """("shards", folder) or ("documents", inputs); a missing file or folder raises FileNotFoundError naming it."""
    items = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    if not items:
        raise ValueError("no corpus given: expected a file, a folder, a glob or a folder of token shards")
    for it in items:
        spec = expand_placeholders(str(it))
        if not (_GLOB_CHARS & set(spec)) and not Path(spec).expanduser().exists():
            raise FileNotFoundError(f"contamination corpus {str(it)!r} not found: expected a file, a folder, "
                                    f"a glob or a folder of token shards")
    shards = [it for it in items if is_shards(expand_placeholders(str(it)))]
    if shards and len(items) > 1:
        raise ValueError(f"token shards {str(shards[0])!r} must be the only corpus (got {len(items)} inputs)")
    if shards:
        return "shards", Path(expand_placeholders(str(shards[0])))
    return "documents", items


def _verify(task_texts: Mapping[str, Sequence[str]], task_hashes: dict[str, list[np.ndarray]], matches: _Matches,
            units_of: Callable[[Sequence[str]], list[tuple]], show: Callable[[tuple], str], n: int,
            unit: str) -> tuple[dict[str, dict[str, Any]], int]:
    """(per-task report, hash collisions): an example counts as contaminated only if one of its n-grams equals,
    unit for unit, the corpus n-gram its hash matched."""
    found = np.array(sorted(matches.first), np.uint64)
    collisions: set[int] = set()
    tasks: dict[str, dict[str, Any]] = {}
    for task, hashes in task_hashes.items():
        texts = task_texts[task]
        hits = {}  # example -> positions of its n-grams whose hash the corpus matched
        for i, h in enumerate(hashes):
            if len(found) and len(h):
                pos = np.flatnonzero(found[np.minimum(np.searchsorted(found, h), len(found) - 1)] == h)
                if len(pos):
                    hits[i] = pos
        dirty: list[int] = []
        example: tuple[str, str] | None = None
        for (i, pos), u in zip(hits.items(), units_of([texts[i] for i in hits])):
            for p in pos.tolist():
                key = int(hashes[i][p])
                where, corpus_units = matches.first[key]
                if tuple(u[p:p + n]) == corpus_units:
                    dirty.append(i)
                    if example is None:
                        example = (show(corpus_units), where)
                    break
                collisions.add(key)
        total = len(texts)
        tasks[task] = {"examples": total, "contaminated": len(dirty),
                       "share": len(dirty) / total if total else None,
                       "too_short": sum(len(h) == 0 for h in hashes), "ngram": n, "unit": unit,
                       "first_contaminated": dirty[:MAX_REPORTED],
                       "matched_ngram_example": example[0] if example else None,
                       "matched_source": example[1] if example else None}
    return tasks, len(collisions)


def contamination(task_texts: Mapping[str, Sequence[str]],
                  corpus: str | os.PathLike | Sequence[str | os.PathLike], n: int = NGRAM, tokenizer: Any = None, *,
                  include: Sequence[str] | None = None, exclude: Sequence[str] = (), text_key: str = "text",
                  chunk_bytes: int = 8 << 20, chunk_tokens: int = 1 << 22,
                  show_progress: bool = True) -> dict[str, Any]:
    """Per task, the share of examples with an `n`-gram in `corpus` (documents: word n-grams; a token-shard
    folder: token n-grams under `tokenizer` (a Tokenizer or its folder; default the one the index names), which
    must match the shards' fingerprint).

    Each example is one string (what the model sees plus its gold answer; leave out text every example shares,
    such as a prompt template, or every example matches through it). Returns ``{"ngram", "unit", "corpus":
    scan stats, "tasks": {task: {"examples", "contaminated", "share", "too_short", "first_contaminated",
    "matched_ngram_example", "matched_source", ...}}}``; examples shorter than `n` units cannot match and are
    counted in ``too_short`` (and in ``examples``).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(task_texts, Mapping):
        raise TypeError(f"task_texts must map task names to lists of example strings, got {type(task_texts).__name__}")
    for task, texts in task_texts.items():
        if isinstance(texts, str):
            raise TypeError(f"task {task!r}: expected a list of example strings, got one string")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"task {task!r} example {i}: expected a string, got {type(t).__name__}")
    kind, source = _check_corpus(corpus)
    start = time.perf_counter()

    # task side: one (n-gram hashes,) array per example
    if kind == "shards":
        index = read_index(source)
        tok = _shard_tokenizer(source, index, tokenizer)
        encode = _shard_encoder(tok)
        table = _token_table(max(int(index["tokenizer"].get("vocab_size") or 0), tok.vocab_size))

        def units_of(texts: Sequence[str]) -> list[tuple]:
            return [tuple(ids) for ids in encode(list(texts))] if texts else []

        def hashes_of(u: tuple) -> np.ndarray:
            return _window_hashes(table[np.asarray(u, np.int64)], n)

        def show(u: tuple) -> str:
            return tok.decode(list(u), skip_special_tokens=False)
    else:
        def units_of(texts: Sequence[str]) -> list[tuple]:
            return [tuple(_normalize(t.encode("utf-8", "surrogatepass"))) for t in texts]

        def hashes_of(u: tuple) -> np.ndarray:
            return _window_hashes(_word_hashes(list(u)), n)

        def show(u: tuple) -> str:
            return b" ".join(u).decode("utf-8", "replace")

    task_hashes = {task: [hashes_of(u) for u in units_of(texts)] for task, texts in task_texts.items()}
    ngrams = _NgramSet([h for hs in task_hashes.values() for h in hs])
    unit = "tokens" if kind == "shards" else "words"

    # corpus side: one pass
    matches = _Matches()
    stats: dict[str, Any] = {"kind": kind, "path": str(source) if kind == "shards" else [str(s) for s in source],
                             "documents": 0, "bytes": 0, unit: 0, "ngrams": 0, "task_ngrams": len(ngrams),
                             "skipped": None}
    if kind == "shards":
        stats = {k: v for k, v in stats.items() if k not in ("documents", "bytes")}
    scan_start = time.perf_counter()
    if len(ngrams) == 0:
        stats["skipped"] = f"no task example has {n} or more {unit}"
    elif kind == "shards":
        _scan_shards(source, index, table, ngrams, n, matches, stats, chunk_tokens=chunk_tokens,
                     show_progress=show_progress)
    else:
        _scan_documents(source, ngrams, n, matches, stats, include=include, exclude=exclude, text_key=text_key,
                        chunk_bytes=chunk_bytes, show_progress=show_progress)
    scan_s = time.perf_counter() - scan_start

    tasks, collisions = _verify(task_texts, task_hashes, matches, units_of, show, n, unit)
    stats.update({"matched_hashes": len(matches.first), "corpus_hits": matches.hits,
                  "hash_collisions": collisions, "scan_seconds": round(scan_s, 3),
                  "seconds": round(time.perf_counter() - start, 3)})
    if kind == "shards":
        stats["tokens_per_s"] = round(stats["tokens"] / scan_s) if scan_s > 0 and stats["tokens"] else None
    else:
        stats["mb_per_s"] = round(stats["bytes"] / 1e6 / scan_s, 1) if scan_s > 0 and stats["bytes"] else None
    return {"ngram": n, "unit": unit, "corpus": stats, "tasks": tasks}
