"""ZeRO stages 1 and 2 on torch.distributed (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models", section 5): every process keeps the whole model, but each parameter has one owner.

- Stage 1 (optimizer-state sharding): gradients are all-reduced as under DDP; each process's optimizer holds the
  moments of the parameters it owns only (P_os: 1/N of the optimizer memory), steps them, and the owner broadcasts
  the updated values.
- Stage 2 (+ gradient sharding): no all-reduce; as backward produces a parameter's gradient it is reduced onto the
  owner and dropped everywhere else (P_os+g), so at most one gradient that a process does not own is alive.
- Stage 3 (+ parameter sharding) is FSDP2 (`train.parallel.dp: fsdp`), in `distributed.wrap`.

Ownership is a greedy balance by size over the trainable parameters in `named_parameters()` order (the same on
every process). Checkpoints hold the full optimizer state keyed by parameter name, as a single process writes it, so
a run saved under ZeRO resumes under DDP, FSDP2, another world size or one process, and the other way round.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .distributed import World


def owners(named: list[tuple[str, Tensor]], processes: int) -> dict[str, int]:
    """Parameter name -> owning rank: largest first, each to the least loaded rank (ties: lowest rank)."""
    load = [0] * processes
    out: dict[str, int] = {}
    for name, p in sorted(named, key=lambda np_: -np_[1].numel()):  # stable: equal sizes keep model order
        rank = min(range(processes), key=lambda r: (load[r], r))
        out[name] = rank
        load[rank] += p.numel()
    return out


class ZeroSharding:
    """The per-process side of ZeRO-1/2 for `model` (a plain module; stage 1 runs it inside DDP)."""

    def __init__(self, model: nn.Module, world: World, stage: int):
        if stage not in (1, 2):
            raise ValueError(f"ZeRO stage: expected 1 or 2 (stage 3 is FSDP2), found {stage}")
        self.model, self.world, self.stage = model, world, stage
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.owner = owners(self.named, world.world)
        self.owned = {n for n, r in self.owner.items() if r == world.rank}
        self._hooks = []
        if stage == 2:
            for name, p in self.named:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._reduce_hook(name)))

    def _reduce_hook(self, name: str):
        dst = self.owner[name]

        def hook(p: Tensor) -> None:
            # every micro batch: the owner's .grad becomes the sum over processes of all micro batches so far
            # (its own earlier sum + this micro batch's local gradients); elsewhere the gradient is dropped
            dist.reduce(p.grad, dst=dst, op=dist.ReduceOp.SUM)
            if dst != self.world.rank:
                p.grad = None

        return hook

    def finish_gradients(self) -> None:
        """After the step's backward passes: owned gradients hold the mean over processes, others are dropped
        (stage 1 drops what the all-reduce delivered but this process does not step; stage 2 divides the sum)."""
        for name, p in self.named:
            if name not in self.owned:
                p.grad = None
            elif self.stage == 2 and p.grad is not None:
                p.grad.div_(self.world.world)

    def clip_grad_norm(self, max_norm: float) -> Tensor:
        """Global gradient norm over every process's owned gradients (one all-reduce of the squared sums), and
        torch's `clip_grad_norm_` scaling (max_norm / (norm + 1e-6), at most 1) applied to the owned ones."""
        grads = [p.grad for n, p in self.named if n in self.owned and p.grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=self.world.device)
        for g in grads:
            sq = sq + torch.linalg.vector_norm(g.float()) ** 2
        dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        norm = sq.sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return norm

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        """Each owner sends its updated parameters to every process."""
        for name, p in self.named:
            dist.broadcast(p.data, src=self.owner[name])

    # ---- checkpoints: the full optimizer state, keyed by parameter name
    def gather_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """On rank 0: {"state": {name: {...}}, "param_groups": [...]} with every process's share, groups listing
        every parameter in model order (as a single process's optimizer state dict). None on other ranks."""
        name_of = {id(p): n for n, p in self.named}
        state = {name_of[id(p)]: {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in st.items()}
                 for p, st in optimizer.state.items()}
        groups = [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        shares = [None] * self.world.world
        dist.all_gather_object(shares, (state, groups))
        if not self.world.main:
            return None
        order = {n: i for i, (n, _) in enumerate(self.named)}
        full_state: dict[str, Any] = {}
        full_groups: list[list[str]] = [[] for _ in optimizer.param_groups]
        for share_state, share_groups in shares:
            full_state.update(share_state)
            for i, names in enumerate(share_groups):
                full_groups[i].extend(names)
        out_groups = []
        for g, names in zip(optimizer.param_groups, full_groups):
            names = sorted(names, key=order.__getitem__)
            hyper = {k: v for k, v in g.items() if k not in ("params", "names")}
            out_groups.append(dict(hyper, params=names, **({"names": names} if "names" in g else {})))
        return {"state": full_state, "param_groups": out_groups}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, osd: dict[str, Any]) -> None:
        """Give this process's optimizer the state of the parameters it owns, from a full (by name) state dict."""
        params = dict(self.named)
        if len(osd["param_groups"]) != len(optimizer.param_groups):
            raise ValueError(f"checkpoint optimizer has {len(osd['param_groups'])} parameter groups, this run "
                             f"{len(optimizer.param_groups)}")
        for g, saved in zip(optimizer.param_groups, osd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k not in ("params", "names")})
        for name in self.owned:
            st = osd["state"].get(name)
            if st is not None:
                p = params[name]
                # moments onto the parameter's device; torch keeps AdamW's step count on the CPU
                optimizer.state[p] = {k: v.to(p.device if k != "step" else v.device, copy=True)
                                      if isinstance(v, Tensor) else v for k, v in st.items()}
