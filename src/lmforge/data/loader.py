"""Packed training sequences from token shards: deterministic shuffle, exact resume, mixtures, rank sharding.

The global sample stream is fixed by the seed alone: global sample g of a mixture comes from a source chosen
by a counter-based draw, and each source walks a per-epoch permutation of its fixed-length windows. Every
micro-step takes the next `micro_batch * world` global samples and rank r keeps its slice, so a run resumes
at the exact next sample under the same or a different world size (same global batch, same data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .readers import DataError
from .shards import open_split, read_index

_BLOCK = 4096  # mixture draws are made in blocks of this many global samples


class TokenWindows:
    """Windows of `length` tokens at stride `stride` over the concatenated shards of one split."""

    def __init__(self, data_dir: str | Path, split: str, length: int, stride: int | None = None):
        self.data_dir, self.split = str(data_dir), split
        self.index = read_index(data_dir)
        self.arrays = open_split(data_dir, split)
        sizes = np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # (S + 1,)
        self.total = int(self.starts[-1])
        self.length, self.stride = length, stride or length
        self.n = max(0, (self.total - length) // self.stride + 1)
        if self.n == 0:
            raise DataError(f"{data_dir}: split {split!r} has {self.total} tokens, fewer than one window of "
                            f"{length}; prepare more data or lower the sequence length")

    def __len__(self) -> int:
        return self.n

    def window(self, i: int) -> np.ndarray:
        """Tokens [i*stride, i*stride + length) as int64, reading across shard boundaries."""
        a = i * self.stride
        b = a + self.length
        s = int(np.searchsorted(self.starts, a, side="right") - 1)
        parts = []
        while a < b:
            off = a - self.starts[s]
            take = min(b - a, len(self.arrays[s]) - off)
            parts.append(np.asarray(self.arrays[s][off:off + take], dtype=np.int64))
            a += take
            s += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class SourceSpec:
    """One data source of a mixture."""

    path: str
    """Directory of token shards written by `lmforge prepare`."""
    weight: float = 1.0
    """Relative sampling weight in the mixture."""


def causal_collate(windows: list[np.ndarray], ids: list[int], loader: "PackedLoader") -> dict[str, torch.Tensor]:
    """Next-token pairs from windows of T + 1 tokens: input_ids = w[:-1], labels = w[1:] (B, T)."""
    x = torch.from_numpy(np.stack(windows))  # (B, T + 1)
    return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}


class PackedLoader:
    """Batches of packed sequences with exact-resume state.

    By default each sample is a window of seq_len + 1 tokens (consecutive windows share one token) formatted
    for next-token prediction; `window` + `collate` give other formats (masked LM pairs)."""

    def __init__(self, sources: list[SourceSpec], seq_len: int, micro_batch: int, *, split: str = "train",
                 seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True,
                 collate: Callable[[list[np.ndarray], list[int], "PackedLoader"], dict] | None = None,
                 window: int | None = None):
        if not sources:
            raise ValueError("no data sources given")
        length = window or seq_len + 1
        self.windows = [TokenWindows(s.path, split, length, stride=length - 1 if window is None else length)
                        for s in sources]
        self.collate = collate or causal_collate
        fps = {w.index["tokenizer"]["fingerprint"] for w in self.windows}
        if len(fps) > 1:
            raise ValueError(f"data sources were tokenized with different tokenizers: {[s.path for s in sources]}")
        w = np.array([s.weight for s in sources], dtype=np.float64)
        if (w <= 0).any():
            raise ValueError(f"mixture weights must be > 0, found {w.tolist()}")
        self.probs = w / w.sum()
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.pos = 0  # global samples consumed
        self.source_pos = [0] * len(sources)  # samples consumed from each source
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, permutation)
        self._blocks: dict[int, np.ndarray] = {}  # block -> source draws

    # ---- determinism
    def _sources_of(self, g0: int, n: int) -> np.ndarray:
        """Source index of global samples g0 .. g0+n-1 (counter-based: independent of world size)."""
        if len(self.windows) == 1:
            return np.zeros(n, dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        for k in range(n):
            g = g0 + k
            block = self._block(g // _BLOCK)
            out[k] = block[g % _BLOCK]
        return out

    def _block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            self._blocks = {k: v for k, v in self._blocks.items() if k >= b - 1}
            rng = np.random.default_rng([self.seed, 1, b])
            self._blocks[b] = rng.choice(len(self.windows), size=_BLOCK, p=self.probs)
        return self._blocks[b]

    def _window_index(self, s: int, p: int) -> int:
        """Window of source s at its stream position p (epoch = p // n, shuffled within each epoch)."""
        n = len(self.windows[s])
        epoch, i = divmod(p, n)
        if not self.shuffle:
            return i
        if self._perms.get(s, (None,))[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + s * 7919 + epoch)
            self._perms[s] = (epoch, torch.randperm(n, generator=g).numpy())
        return int(self._perms[s][1][i])

    # ---- batches
    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's micro batch, formatted by `collate` (default: input_ids and labels (B, T))."""
        chunk = self.micro_batch * self.world
        srcs = self._sources_of(self.pos, chunk)
        counts = list(self.source_pos)
        mine, ids = [], []
        lo, hi = self.rank * self.micro_batch, (self.rank + 1) * self.micro_batch
        for k, s in enumerate(srcs):
            if lo <= k < hi:
                mine.append(self.windows[s].window(self._window_index(int(s), counts[s])))
                ids.append(self.pos + k)
            counts[s] += 1
        self.source_pos = counts
        self.pos += chunk
        return self.collate(mine, ids, self)

    def random_window(self, g: int) -> np.ndarray:
        """A window drawn by global sample g's own counter-based RNG (e.g. the random second segment of NSP)."""
        rng = np.random.default_rng([self.seed, 2, g])
        s = int(rng.choice(len(self.windows), p=self.probs))
        return self.windows[s].window(int(rng.integers(len(self.windows[s]))))

    @property
    def epoch(self) -> float:
        return sum(p / len(w) for p, w in zip(self.source_pos, self.windows)) / len(self.windows)

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "source_pos": list(self.source_pos), "seed": self.seed,
                "sources": [w.data_dir for w in self.windows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or len(state["source_pos"]) != len(self.windows):
            raise ValueError(f"data state of a different loader (seed {state['seed']}, sources {state['sources']}) "
                             f"cannot resume this one (seed {self.seed}, sources "
                             f"{[w.data_dir for w in self.windows]})")
        self.pos, self.source_pos = int(state["pos"]), [int(p) for p in state["source_pos"]]


def eval_batches(sources: list[SourceSpec], seq_len: int, micro_batch: int, *, max_batches: int | None = None,
                 rank: int = 0, world: int = 1, **loader_kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The validation split in order (no shuffle), formatted like training batches.

    `max_batches` counts micro batches of one process (max_batches x micro_batch sequences in all, shared by
    the processes), so the evaluated windows do not depend on the world size. A last partial batch is dropped
    so that every rank runs the same number of batches."""
    loader = PackedLoader(sources, seq_len, micro_batch, split="validation", shuffle=False, rank=rank,
                          world=world, **loader_kwargs)
    windows = len(loader.windows[0])
    if max_batches is not None:
        windows = min(windows, max_batches * micro_batch)
    n = windows // (micro_batch * world)
    if n == 0:
        raise DataError(f"{sources[0].path}: {windows} validation windows are fewer than one batch of "
                        f"{micro_batch} x {world} processes; lower the batch size or raise validation_fraction")
    for _ in range(n):
        yield loader.next_batch()
