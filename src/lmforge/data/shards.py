"""Token shards: documents -> flat little-endian uint16/uint32 token files + ``index.json``; and their reader.

Layout of an output folder (format ``lmforge-shards/1``):

- ``{split}-{k:05d}.bin`` for split in train/validation: each split is one token stream cut into shards of
  exactly ``shard_tokens`` tokens (the last one shorter), so a document may continue in the next shard. Every
  document is followed by the tokenizer's EOS id (and preceded by BOS with ``add_bos``).
- ``index.json`` (written last, atomically): format, dtype, tokenizer (fingerprint, vocab_size, eos_id, path),
  per split the shards with their ``tokens``, ``documents`` (documents that end in the shard) and ``bytes``
  (UTF-8 bytes of those documents' texts), the inputs and the config.

Documents go to the validation split by a hash of their id (or text), so the split is stable across runs and
worker counts. Shards are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import re
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..splits import in_fraction
from .readers import DataError, ReadStats, expand_inputs, iter_documents

__all__ = ["FORMAT", "SPLITS", "PrepareResult", "prepare_shards", "read_index", "open_split", "token_dtype"]

FORMAT = "lmforge-shards/1"
SPLITS = ("train", "validation")
_OURS = re.compile(r"^\.?(train|validation)-\d{5}\.bin(\.tmp)?$")
_MAX_BATCH_CHARS = 4 * 2**20
MAX_PIECE_CHARS = 2**20
"""Documents longer than this are tokenized piece by piece (cut at line breaks), so one huge document costs the
memory of one piece, not of its whole tokenization at once (a 50 MB record took `prepare` to 8 GB)."""
# settings that change the shards' content; the others (workers, batch size) do not
_OUTPUT_KEYS = ("inputs", "include", "exclude", "text_key", "validation_fraction", "shard_tokens", "max_documents",
                "add_bos")


def token_dtype(vocab_size: int) -> str:
    """Shard dtype for a vocabulary: uint16 up to 65536 tokens, else uint32."""
    return "uint16" if vocab_size <= 65536 else "uint32"


# ----------------------------------------------------------------------------- reading

def read_index(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and validate ``index.json`` of a shard folder (format, dtype, splits)."""
    path = Path(data_dir) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {data_dir} is not a token-shard folder (make one with "
                                f"`lmforge prepare`), or its preparation did not finish")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); expected a shard index") from None
    fmt = index.get("format") if isinstance(index, dict) else None
    if fmt != FORMAT:
        raise DataError(f"{path}: format is {fmt!r}, expected {FORMAT!r}")
    if index.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype is {index.get('dtype')!r}, expected 'uint16' or 'uint32'")
    if not isinstance(index.get("splits"), dict):
        raise DataError(f"{path}: no 'splits' object; expected {{'train': {{'shards': [...]}}, ...}}")
    return index


def open_split(data_dir: str | os.PathLike, split: str) -> list[np.memmap]:
    """Read-only memory maps of a split's shards, in order; checks each file's size against the index."""
    index = read_index(data_dir)
    if split not in index["splits"]:
        raise DataError(f"{Path(data_dir) / 'index.json'}: no split {split!r}; found {sorted(index['splits'])}")
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    maps = []
    for shard in index["splits"][split]["shards"]:
        f = Path(data_dir) / shard["file"]
        want = shard["tokens"] * dtype.itemsize
        size = f.stat().st_size if f.exists() else None
        if size != want:
            found = "missing" if size is None else f"{size} bytes"
            raise DataError(f"{f}: {found}, expected {want} bytes ({shard['tokens']} {index['dtype']} tokens)")
        maps.append(np.memmap(f, dtype=dtype, mode="r"))
    return maps


# ----------------------------------------------------------------------------- workers

_W: dict[str, Any] = {}


def _init_worker(backend_json: str, eos_id: int, bos_id: int | None, dtype: str, fraction: float) -> None:
    """Load the tokenizer once per worker process."""
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(backend_json)
    backend.encode_special_tokens = True  # "<|endoftext|>" written in a document is text, not a document boundary
    _W.update(backend=backend, eos=eos_id, bos=bos_id, dtype=np.dtype(dtype).newbyteorder("<"),
              fraction=fraction)


def _encode(batch: list[tuple[str, str | None]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Tokenize a batch of (text, id): (flat tokens with BOS/EOS, tokens per doc, bytes per doc, in validation,
    documents tokenized in pieces)."""
    ids, pieced = _token_ids([t for t, _ in batch])
    bos, eos = _W["bos"], _W["eos"]
    head = 0 if bos is None else 1
    lengths = np.fromiter((len(x) + head + 1 for x in ids), np.int64, len(ids))
    flat = np.empty(int(lengths.sum()), _W["dtype"])
    pos = 0
    for x, n in zip(ids, lengths.tolist()):
        if head:
            flat[pos] = bos
        flat[pos + head:pos + n - 1] = x
        flat[pos + n - 1] = eos
        pos += n
    nbytes = np.fromiter((len(t.encode("utf-8", "surrogatepass")) for t, _ in batch), np.int64, len(batch))
    val = np.fromiter((in_fraction(i if i is not None else t, _W["fraction"]) for t, i in batch), bool, len(batch))
    return flat, lengths, nbytes, val, pieced


def _token_ids(texts: list[str]) -> tuple[list[Any], int]:
    """(token ids of each text, how many were tokenized in pieces): texts up to MAX_PIECE_CHARS in one batch call,
    longer ones piece by piece into an array."""
    backend = _W["backend"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: we only need ids
    ids: list[Any] = [None] * len(texts)
    short = [i for i, t in enumerate(texts) if len(t) <= MAX_PIECE_CHARS]
    for i, enc in zip(short, encode([texts[i] for i in short], add_special_tokens=False)):
        ids[i] = enc.ids
    long = [i for i, t in enumerate(texts) if len(t) > MAX_PIECE_CHARS]
    for i in long:
        ids[i] = np.concatenate([np.asarray(encode([piece], add_special_tokens=False)[0].ids, np.int64)
                                 for piece in text_pieces(texts[i], MAX_PIECE_CHARS)])
    return ids, len(long)


def text_pieces(text: str, size: int) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters. Each cut falls, where the second half of the piece
    has one, just before a line break (else a space) that follows a non-space character: every pre-tokenizer
    starts a new word there, so the pieces' tokens are the tokens of the whole text."""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = _word_start(text, "\n", start + size // 2, end)
        if cut < 0:
            cut = _word_start(text, " ", start + size // 2, end)
        end = end if cut < 0 else cut
        yield text[start:end]
        start = end
    yield text[start:]


def _word_start(text: str, sep: str, lo: int, hi: int) -> int:
    """The last index in [lo, hi) holding `sep` right after a non-space character, or -1."""
    at = text.rfind(sep, lo, hi)
    while at > lo and text[at - 1].isspace():
        at = text.rfind(sep, lo, at)
    return at if at > lo else -1


class _ShardWriter:
    """Appends tokens to ``{split}-{k:05d}.bin`` files of exactly `shard_tokens` tokens, via temp names."""

    def __init__(self, out: Path, split: str, shard_tokens: int) -> None:
        self.out, self.split, self.cap = out, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.file = None
        self.tokens = self.documents = self.bytes = 0

    def _tmp(self) -> Path:
        return self.out / f".{self.split}-{len(self.shards):05d}.bin.tmp"

    def add(self, tokens: np.ndarray, lengths: np.ndarray, nbytes: np.ndarray) -> None:
        """Write the documents' tokens; a document counts in (and brings its bytes to) the shard it ends in."""
        ends = np.cumsum(lengths)
        pos = 0
        while pos < len(tokens):
            if self.file is None:
                self.file = open(self._tmp(), "wb")
            take = min(self.cap - self.tokens, len(tokens) - pos)
            self.file.write(tokens[pos:pos + take].tobytes())
            done = (ends > pos) & (ends <= pos + take)
            self.documents += int(done.sum())
            self.bytes += int(nbytes[done].sum())
            self.tokens += take
            pos += take
            if self.tokens == self.cap:
                self._close()

    def _close(self) -> None:
        self.file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        os.replace(self._tmp(), self.out / name)
        self.shards.append({"file": name, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes})
        self.file, self.tokens, self.documents, self.bytes = None, 0, 0, 0

    def finish(self) -> dict[str, Any]:
        """Close the last shard; the split's entry for the index."""
        if self.file is not None:
            self._close()
        total = {k: sum(s[k] for s in self.shards) for k in ("tokens", "documents", "bytes")}
        return {"shards": self.shards, **total}

    def abort(self) -> None:
        if self.file is not None:
            self.file.close()
            self._tmp().unlink(missing_ok=True)


# ----------------------------------------------------------------------------- preparing

@dataclass
class PrepareResult:
    """What `prepare_shards` did: the index, whether finished output was reused, and the time taken."""

    index: dict[str, Any]
    skipped: bool
    seconds: float


def _inputs_fingerprint(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _batches(docs: Iterator, size: int) -> Iterator[list[tuple[str, str | None]]]:
    batch: list[tuple[str, str | None]] = []
    chars = 0
    for doc in docs:
        batch.append((doc.text, doc.id))
        chars += len(doc.text)
        if len(batch) >= size or chars >= _MAX_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


@contextmanager
def _worker_pool(workers: int, initargs: tuple) -> Iterator[Any]:
    """A pool of `workers` tokenizer processes (None for 0: tokenize in this process)."""
    if workers <= 0:
        _init_worker(*initargs)
        try:
            yield None
        finally:
            _W.clear()
        return
    # fork where available (no re-import of the caller's __main__); each worker encodes serially (one worker per
    # core), which also keeps a forked child away from the tokenizer thread pool its parent may have started
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=initargs)
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        yield pool


def _results(batches: Iterator[list], pool: Any, workers: int) -> Iterator[tuple]:
    """`_encode` over batches, in order; at most 2 batches per worker in flight (bounded memory)."""
    if pool is None:
        yield from map(_encode, batches)
        return
    pending: deque = deque()
    for batch in batches:
        pending.append(pool.apply_async(_encode, (batch,)))
        if len(pending) >= 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _load_tokenizer(source: Any) -> tuple[Any, str | None]:
    """(Tokenizer, resolved path or None) from a Tokenizer, a tokenizer folder, or what load_tokenizer takes."""
    from ..tokenizer import Tokenizer

    if isinstance(source, Tokenizer):
        return source, None
    if (Path(source) / "tokenizer.json").exists():  # a tokenizer folder: no need to import the model code
        return Tokenizer.from_dir(source), str(Path(source).resolve())
    from ..models.loading import load_tokenizer, resolve

    return load_tokenizer(source), str(resolve(source).resolve())


def _finished(out: Path, settings: dict, fingerprint: str, inputs_fp: str, overwrite: bool) -> dict | None:
    """The index of a finished identical run in `out` (to reuse); else clear `out` of earlier shards."""
    if (out / "index.json").exists():
        old = read_index(out)
        differs = [k for k in _OUTPUT_KEYS if old.get("config", {}).get(k) != settings[k]]
        if old["tokenizer"].get("fingerprint") != fingerprint:
            differs.append("tokenizer")
        if old.get("inputs_fingerprint") != inputs_fp:
            differs.append("input files (paths, sizes or modification times)")
        if not differs:
            for split in old["splits"]:
                open_split(out, split)  # the shards are all there, with the right sizes
            return old
        if not overwrite:
            raise DataError(f"{out} holds token shards prepared differently ({', '.join(differs)} changed); "
                            f"set overwrite=true to replace them, or choose another output")
        (out / "index.json").unlink()  # first, so a crash below leaves no index over mismatched shards
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():  # shards and temp files of an earlier (maybe interrupted) run; only our names
        if _OURS.match(f.name):
            f.unlink()
    return None


def prepare_shards(inputs: Sequence[str | os.PathLike], tokenizer: Any, output: str | os.PathLike, *,
                   include: Sequence[str] | None = None, exclude: Sequence[str] = (), text_key: str = "text",
                   validation_fraction: float = 0.005, shard_tokens: int = 100_000_000,
                   num_workers: int | None = None, batch_documents: int = 256, max_documents: int | None = None,
                   add_bos: bool = False, overwrite: bool = False, show_progress: bool = True) -> PrepareResult:
    """Tokenize the documents of `inputs` into token shards in `output` (see the module docstring).

    `tokenizer` is an lmforge Tokenizer or anything `lmforge.load_tokenizer` resolves. A finished output with
    the same settings, tokenizer and input files is reused; an interrupted one (no index) is cleaned and redone.
    """
    from ..progress import progress

    start = time.perf_counter()
    tokenizer, tok_path = _load_tokenizer(tokenizer)
    eos_token = tokenizer.eos_token if tokenizer.eos_id is not None else tokenizer.sep_token
    eos_id = tokenizer.token_id(eos_token)
    if eos_id is None:
        raise DataError(f"tokenizer {tok_path or ''} has no eos token (eos_token {tokenizer.eos_token!r} in "
                        f"tokenizer_config.json, or sep_token): prepare appends it after every document")
    bos_id = tokenizer.bos_id if add_bos else None
    if add_bos and bos_id is None:
        raise DataError(f"add_bos is set but tokenizer {tok_path or ''} has no bos token")
    out = Path(output)
    settings = {"inputs": [str(p) for p in inputs], "include": list(include) if include is not None else None,
                "exclude": list(exclude), "text_key": text_key, "validation_fraction": validation_fraction,
                "shard_tokens": shard_tokens, "max_documents": max_documents, "add_bos": add_bos}
    files = expand_inputs(inputs, include, exclude)
    fingerprint, inputs_fp = tokenizer.fingerprint(), _inputs_fingerprint(files)

    done = _finished(out, settings, fingerprint, inputs_fp, overwrite)
    if done is not None:
        return PrepareResult(done, True, time.perf_counter() - start)

    dtype = token_dtype(tokenizer.vocab_size)
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    writers = {s: _ShardWriter(out, s, shard_tokens) for s in SPLITS}
    stats = ReadStats()
    docs = iter_documents(inputs, text_key, include, exclude, stats)
    if max_documents is not None:
        docs = itertools.islice(docs, max_documents)
    initargs = (tokenizer.backend.to_str(), eos_id, bos_id, dtype, validation_fraction)
    n_bytes = pieced = 0
    try:
        with _worker_pool(workers, initargs) as pool, \
                progress(None, "prepare", unit="docs", enabled=show_progress) as bar:
            for flat, lengths, nbytes, val, n_pieced in _results(_batches(docs, batch_documents), pool, workers):
                pieced += n_pieced
                if not val.any():
                    writers["train"].add(flat, lengths, nbytes)
                else:
                    mask = np.repeat(val, lengths)
                    writers["train"].add(flat[~mask], lengths[~val], nbytes[~val])
                    writers["validation"].add(flat[mask], lengths[val], nbytes[val])
                n_bytes += int(nbytes.sum())
                bar.advance(len(lengths), MB=round(n_bytes / 1e6, 1))
        splits = {s: w.finish() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    index = {"format": FORMAT, "dtype": dtype,
             "tokenizer": {"fingerprint": fingerprint, "vocab_size": tokenizer.vocab_size, "eos_id": eos_id,
                           "eos_token": eos_token, "bos_id": bos_id, "path": tok_path},
             "splits": splits, "inputs": settings["inputs"], "inputs_fingerprint": inputs_fp,
             "config": {**settings, "num_workers": workers, "batch_documents": batch_documents},
             "stats": {"files": stats.files, "documents": stats.documents, "empty_documents_skipped": stats.empty,
                       "undecodable_bytes_replaced": stats.replaced,
                       "long_documents_tokenized_in_pieces": pieced}}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "index.json")
    return PrepareResult(index, False, time.perf_counter() - start)
