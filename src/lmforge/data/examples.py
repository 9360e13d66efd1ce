"""Batches of tokenized examples (fine-tuning data) with exact-resume state.

`ExampleLoader` shuffles a list of examples once per epoch (a permutation seeded by seed and epoch), gives each
process its own share of every global batch, and formats micro batches with a `collate` function. Its state is a
counter, so resume continues at the exact example whatever happened before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor


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


def pair_framing(tokenizer: Any, purpose: str) -> tuple[bool, int | None]:
    """(encoder, eos id) of a tokenizer that frames one or two texts for a task head: an encoder has a CLS token, a
    decoder ends each part with EOS; a ValueError saying what the framing is for (`purpose`) when it has neither."""
    encoder = tokenizer.cls_token is not None
    if not encoder and tokenizer.eos_id is None:
        raise ValueError("the tokenizer has neither a CLS token (encoder) nor an EOS token (decoder); expected one "
                         f"to {purpose}")
    return encoder, tokenizer.eos_id


def pad_right(input_ids: Sequence[Sequence[int]], pad_id: int,
              token_type_ids: Sequence[Sequence[int] | None] | None = None) -> dict[str, Tensor]:
    """A batch of token lists right-padded with `pad_id`: input_ids and attention_mask (B, T), 1 = real token, and
    token_type_ids (B, T) when every row has them (a mix is a ValueError: one tokenizer per batch)."""
    if pad_id is None:
        raise ValueError("pad_id is None: give the tokenizer's pad (or, for decoders without one, eos) token id")
    typed = {t is not None for t in token_type_ids} if token_type_ids is not None else {False}
    if len(typed) > 1:
        raise ValueError("some rows have token_type_ids and some do not; expected one tokenizer per batch")
    b, t = len(input_ids), max(len(x) for x in input_ids)
    ids = torch.full((b, t), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((b, t), dtype=torch.long)  # (B, T)
    for i, x in enumerate(input_ids):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if typed == {True}:
        types = torch.zeros((b, t), dtype=torch.long)  # (B, T)
        for i, x in enumerate(token_type_ids):
            types[i, :len(x)] = torch.tensor(x)
        batch["token_type_ids"] = types
    return batch


@dataclass
class ReplaySection:
    """Replay against forgetting: pretraining sequences mixed into fine-tuning batches, their loss added."""

    shards: list[str] = field(default_factory=list)
    """Token-shard directories (`lmforge prepare`, tokenized with this model's tokenizer). Given alone (fraction 0)
    they only measure forgetting: the pretraining validation loss before and after."""
    fraction: float = 0.0
    """Replay sequences per fine-tuning sequence in each micro batch (0 = measure only)."""
    weight: float = 1.0
    """Weight of the replay loss: L = L_task + weight · L_pretrain."""
    seq_len: int = 256
    """Tokens per replay sequence."""

    def validate(self) -> None:
        if self.fraction < 0 or self.weight < 0:
            raise ValueError(f"fraction and weight must be >= 0, found {self.fraction} and {self.weight}")
        if self.fraction > 0 and not self.shards:
            raise ValueError(f"fraction {self.fraction} needs shards to replay (token-shard directories)")
