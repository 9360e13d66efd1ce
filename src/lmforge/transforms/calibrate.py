"""Layer-sequential calibration, shared by GPTQ (Frantar et al. 2022, §4 and its reference code) and by pruners
that read activations (Wanda, Sun et al. 2023; SparseGPT, Frantar & Alistarh 2023).

The embedding runs once over the calibration batches; then, block by block, for each group of linears in order
(true-sequential: q/k/v, then o, then gate/up, then down), the block runs over the stored block inputs with
forward hooks that hand each chosen linear's input rows to its observer — the forward stops as soon as the group's
last input has been seen — and each observer's `finish` may modify or replace its layer. Later groups so see the
inputs that the already-modified layers produce, and the block's outputs, recomputed with every modified layer,
feed the next block. Memory: the block inputs and outputs of the calibration set (2 × n × T × C floats) and what
the observers accumulate (e.g. one (in, in) Hessian per layer of the current group).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from ..progress import progress as progress_bar
from .quant import ModuleFilter, block_linears, set_module

__all__ = ["Observer", "calibrate_sequential", "calibration_batches", "block_groups", "TRUE_SEQUENTIAL"]

TRUE_SEQUENTIAL: tuple[tuple[str, ...], ...] = (("attn.q", "attn.k", "attn.v"), ("attn.o",), ("mlp.gate", "mlp.up"),
                                                 ("mlp.down",))
"""In-block order of the linear groups: each group's inputs depend only on the groups before it."""


class Observer(Protocol):
    """What `calibrate_sequential` drives for one linear layer."""

    def add(self, x: Tensor) -> None:
        """Input rows x (N, in), float32, of one calibration batch. Linears fed the same activation (q, k, v;
        gate, up) receive the same tensor object, so observers may share work computed from it."""
        ...

    def finish(self) -> nn.Module | None:
        """All rows were seen: modify the layer in place and return None, or return a module that replaces it."""
        ...


class _StopForward(Exception):
    """Raised by a hook once a group's last input has been seen: the rest of the block need not run."""


def calibration_batches(calibration: Tensor | Sequence[Tensor], batch_size: int, vocab_size: int) -> list[Tensor]:
    """Token batches (b, T) of equal length from a (n, T) tensor or a list of (1, T) / (T,) tensors; ValueError
    naming what was found and what was expected."""
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}, expected a positive integer")
    if isinstance(calibration, Tensor):
        if calibration.dim() != 2:
            raise ValueError(f"calibration tensor has shape {tuple(calibration.shape)}, expected (n, T) token ids")
        seqs = list(calibration)
    else:
        seqs = []
        for i, t in enumerate(calibration):
            if not isinstance(t, Tensor) or t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[0] != 1):
                found = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"calibration item {i} is {found}, expected a (1, T) or (T,) tensor of token ids")
            seqs.append(t.reshape(-1))
    if not seqs:
        raise ValueError("no calibration sequences; expected at least one (1, T) tensor of token ids")
    for i, s in enumerate(seqs):
        if s.dtype.is_floating_point or s.dtype == torch.bool or s.numel() == 0:
            raise ValueError(f"calibration item {i} is {s.dtype} with {s.numel()} tokens, expected integer token ids")
        if int(s.min()) < 0 or int(s.max()) >= vocab_size:
            raise ValueError(f"calibration item {i} has token ids in [{int(s.min())}, {int(s.max())}], expected "
                             f"[0, {vocab_size - 1}] for this model's vocabulary")
    by_len: dict[int, list[Tensor]] = {}
    for s in seqs:
        by_len.setdefault(s.numel(), []).append(s.long())
    return [torch.stack(same[i:i + batch_size]) for _, same in sorted(by_len.items())
            for i in range(0, len(same), batch_size)]


def block_groups(names: Sequence[str], true_sequential: bool = True) -> list[list[str]]:
    """The chosen in-block linear names (`attn.q`, ...) grouped in calibration order: TRUE_SEQUENTIAL's groups,
    then any other linear alone in module order; without true_sequential one group of all."""
    if not true_sequential:
        return [list(names)] if names else []
    groups = [[n for n in g if n in names] for g in TRUE_SEQUENTIAL]
    known = {n for g in TRUE_SEQUENTIAL for n in g}
    groups += [[n] for n in names if n not in known]
    return [g for g in groups if g]


def _block_inputs(model: nn.Module, batches: list[Tensor]) -> tuple[list[Tensor], list[tuple]]:
    """(x, the other positional arguments) that blocks[0] receives for each batch; the forward stops there."""
    captured: list[tuple] = []

    def catch(_module, args):
        captured.append(args)
        raise _StopForward

    handle = model.blocks[0].register_forward_pre_hook(catch)
    try:
        for b in batches:
            try:
                model(b.to(model.device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    return [a[0] for a in captured], [tuple(a[1:]) for a in captured]


@torch.no_grad()
def calibrate_sequential(model: nn.Module, calibration: Tensor | Sequence[Tensor],
                         observer: Callable[[str, nn.Linear], Observer], *, modules: ModuleFilter = None,
                         true_sequential: bool = True, batch_size: int = 8, progress: bool = True,
                         description: str = "calibrate") -> nn.Module:
    """Run the layer-sequential calibration (module docstring): `observer(name, linear)` makes the observer of
    each chosen block linear; what its `finish` returns replaces the layer. Returns the model (modified in place)."""
    batches = calibration_batches(calibration, batch_size, model.cfg.vocab_size)
    chosen = {n for n, _ in block_linears(model, modules)}
    if not chosen:
        raise ValueError("no float linear layer inside blocks.* selected for calibration")
    was_training = model.training
    model.eval()
    try:
        xs, rest = _block_inputs(model, batches)
        with progress_bar(len(model.blocks), description, "blocks", enabled=progress) as bar:
            for i, block in enumerate(model.blocks):
                names = [n.removeprefix(f"blocks.{i}.") for n, _ in block.named_modules(prefix=f"blocks.{i}")
                         if n in chosen]
                for group in block_groups(names, true_sequential):
                    _run_group(block, i, group, xs, rest, observer, model)
                if i + 1 < len(model.blocks):  # the next block's inputs, from this block's modified layers
                    xs = [block(x, *r) for x, r in zip(xs, rest)]
                bar.advance(1)
    finally:
        model.train(was_training)
    return model


def _run_group(block: nn.Module, index: int, group: list[str], xs: list[Tensor], rest: list[tuple],
               observer: Callable[[str, nn.Linear], Observer], model: nn.Module) -> None:
    """Feed one group's observers every batch's inputs, then let them finish (and replace their layers)."""
    observers = {n: observer(f"blocks.{index}.{n}", block.get_submodule(n)) for n in group}
    seen: set[str] = set()
    rows: dict[int, tuple[Tensor, Tensor]] = {}  # id(activation) -> (activation, its rows): one object per input

    def hook(name: str):
        def fn(module, args):  # before the layer runs: the last one of the group need not run at all
            a = args[0]
            if id(a) not in rows:
                rows[id(a)] = (a, a.reshape(-1, a.shape[-1]).float())  # (N, in)
            observers[name].add(rows[id(a)][1])
            seen.add(name)
            if len(seen) == len(group):
                raise _StopForward
        return fn

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in group]
    try:
        for x, r in zip(xs, rest):
            seen.clear()
            rows.clear()
            try:
                block(x, *r)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
        rows.clear()
    for n, obs in observers.items():
        new = obs.finish()
        if new is not None:
            set_module(model, f"blocks.{index}.{n}", new)
