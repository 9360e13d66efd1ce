"""The round bookkeeping of the RL batch sources, what makes them resumable at the exact micro-batch:

- `PromptSource`: prompt indices in seeded epochs (its state is a counter);
- `RolloutBuffer`: a round's micro-batches served `num_iterations` times, the unfinished round in its state
  (`tensor_to_json` / `tensor_from_json` keep its tensors exact without pickle);
- `Rounds`: the two together with the round counter and the last round's statistics, owned by each batch source
  (`rl.batches`), which hands it the function that makes its next round.
"""

from __future__ import annotations

import base64
from typing import Any, Callable

import torch
from torch import Tensor

from .rollouts import derive_seed

__all__ = ["PromptSource", "RolloutBuffer", "Rounds", "tensor_to_json", "tensor_from_json"]


class PromptSource:
    """Indices into `n` prompts in epochs of a permutation seeded by (seed, epoch); each process takes its own share
    of every global draw. Its state is one counter, so resume continues at the exact prompt."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("no prompts")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.pos = 0  # global prompts drawn
        self._perm: tuple[int, list[int]] | None = None

    def _index(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed("prompts", self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1][i]

    def take(self, k: int) -> list[int]:
        """This process's k prompt indices of the next global draw of k · world."""
        start = self.pos + self.rank * k
        self.pos += k * self.world
        return [self._index(g) for g in range(start, start + k)]

    @property
    def epoch(self) -> float:
        return self.pos / self.n

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "seed": self.seed, "prompts": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["prompts"] != self.n:
            raise ValueError(f"prompt state of another run (seed {state['seed']}, {state['prompts']} prompts) cannot "
                             f"resume this one (seed {self.seed}, {self.n} prompts)")
        self.pos = int(state["pos"])


def tensor_to_json(t: Tensor) -> dict[str, Any]:
    """A tensor as JSON-safe data (dtype, shape, base64 of its bytes): exact, compact, no pickle."""
    t = t.detach().cpu().contiguous()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(t.numpy().tobytes()).decode()}


def tensor_from_json(d: dict[str, Any]) -> Tensor:
    """The tensor `tensor_to_json` wrote, bit for bit."""
    dtype = getattr(torch, d["dtype"])
    raw = base64.b64decode(d["data"])
    if not raw:
        return torch.empty(d["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(d["shape"]).clone()


class RolloutBuffer:
    """The micro-batches of one round, served `num_iterations` times in order (batch 0, 1, …, n−1, 0, 1, …; TRL's
    order). Its state holds the unfinished round itself: the rollouts and their old log-probs were made with weights
    that no longer exist when a run resumes, so they are saved rather than regenerated."""

    def __init__(self, num_iterations: int = 1):
        self.num_iterations = num_iterations
        self.batches: list[dict[str, Tensor]] = []
        self.served = 0  # micro-batches served from this round, over all iterations

    @property
    def exhausted(self) -> bool:
        return self.served >= len(self.batches) * self.num_iterations

    def fill(self, batches: list[dict[str, Tensor]]) -> None:
        self.batches, self.served = batches, 0

    def next(self) -> dict[str, Tensor]:
        if self.exhausted:
            raise IndexError("the round is used up; fill the buffer with the next round first")
        batch = self.batches[self.served % len(self.batches)]
        self.served += 1
        return dict(batch)

    def state_dict(self) -> dict[str, Any]:
        if self.exhausted:
            return {"served": 0, "batches": []}
        return {"served": self.served, "batches": [{k: tensor_to_json(v) for k, v in b.items()} for b in self.batches]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = [{k: tensor_from_json(v) for k, v in b.items()} for b in state["batches"]]
        self.served = int(state["served"]) if self.batches else 0


class Rounds:
    """The batch-source protocol of the RL stages (`Trainer.fit()` calls `next_batch`, `state_dict`,
    `load_state_dict`, reads `epoch`), less the making of a round: micro-batches served from `buffer`, a new round
    from the caller's `make_round` when it runs out. The state is JSON-safe: the prompt position, the round counter,
    the unfinished round, the last round's statistics."""

    def __init__(self, prompts: int, iterations: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.source = PromptSource(prompts, seed, rank, world)
        self.buffer = RolloutBuffer(iterations)
        self.round = 0  # rounds generated so far
        self.last_stats: dict[str, float] = {}

    def next_batch(self, make_round: Callable[[], None]) -> dict[str, Tensor]:
        """The next micro-batch, after `make_round()` (which calls `finish`) when the round in the buffer is used up."""
        if self.buffer.exhausted:
            make_round()
        return self.buffer.next()

    def finish(self, batches: list[dict[str, Tensor]], stats: dict[str, float]) -> None:
        """Serve a new round's micro-batches from now on, each carrying its statistics as `rollout/<name>` scalars."""
        for b in batches:
            b.update({f"rollout/{k}": torch.tensor(v, dtype=torch.float32) for k, v in stats.items()})
        self.buffer.fill(batches)
        self.last_stats = stats
        self.round += 1

    @property
    def epoch(self) -> float:
        return self.source.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "round": self.round, "buffer": self.buffer.state_dict(),
                "last_stats": self.last_stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self.round = int(state["round"])
        self.buffer.load_state_dict(state["buffer"])
        self.last_stats = dict(state.get("last_stats", {}))
