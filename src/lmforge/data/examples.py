"""Batches of tokenized examples (fine-tuning data) with exact-resume state.

`ExampleLoader` shuffles a list of examples once per epoch (a permutation seeded by seed and epoch), gives each
process its own share of every global batch, and formats micro batches with a `collate` function. Its state is a
counter, so resume continues at the exact example whatever happened before.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch


class ExampleLoader:
    """Micro batches of `micro_batch` examples per process, drawn in epochs of a seeded permutation."""

    def __init__(self, examples: Sequence[Any], micro_batch: int, collate: Callable[[list[Any]], dict], *,
                 seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.micro_batch, self.collate = examples, micro_batch, collate
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.pos = 0  # global examples consumed
        self._perm: tuple[int, list[int]] | None = None

    def _index(self, g: int) -> int:
        n = len(self.examples)
        epoch, i = divmod(g, n)
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(n, generator=gen).tolist())
        return self._perm[1][i]

    def next_batch(self) -> dict[str, torch.Tensor]:
        start = self.pos + self.rank * self.micro_batch
        mine = [self.examples[self._index(g)] for g in range(start, start + self.micro_batch)]
        self.pos += self.micro_batch * self.world
        return self.collate(mine)

    @property
    def epoch(self) -> float:
        return self.pos / len(self.examples)

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "seed": self.seed, "examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["examples"] != len(self.examples):
            raise ValueError(f"data state of a different loader (seed {state['seed']}, {state['examples']} examples) "
                             f"cannot resume this one (seed {self.seed}, {len(self.examples)} examples)")
        self.pos = int(state["pos"])


def fixed_batches(examples: Sequence[Any], micro_batch: int, collate: Callable[[list[Any]], dict], *,
                  rank: int = 0, world: int = 1, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Every example once, in order (validation): this rank's share of each global batch. The last batch may be
    short; a rank with nothing left in it gets no batch, so metrics are exact sums over all examples."""
    step = micro_batch * world
    n = len(examples) if max_batches is None else min(len(examples), max_batches * step)
    for start in range(0, n, step):
        lo = start + rank * micro_batch
        chunk = list(examples[lo:min(lo + micro_batch, n)])
        if chunk:
            yield collate(chunk)


class ReplayMix:
    """Fine-tuning batches with a few pretraining sequences riding along as `replay_input_ids` /
    `replay_labels` (the replay objective adds their loss); resumes both streams exactly."""

    def __init__(self, main: Any, replay: Any):
        self.main, self.replay = main, replay

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.main.next_batch()
        extra = self.replay.next_batch()
        batch["replay_input_ids"], batch["replay_labels"] = extra["input_ids"], extra["labels"]
        return batch

    @property
    def epoch(self) -> float:
        return self.main.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.replay.load_state_dict(state["replay"])
