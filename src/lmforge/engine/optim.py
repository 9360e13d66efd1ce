"""Optimizers: config, weight-decay parameter groups, a builder, and our LAMB.

SGD, momentum, Nesterov, Adam and AdamW are torch's own implementations (fast fused/foreach
kernels); LAMB (You et al., 2019) is written here. ``build_optimizer(model, cfg)`` is the one
entry point the trainer uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["OptimConfig", "param_groups", "build_optimizer", "LAMB", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "lamb")


@dataclass
class OptimConfig:
    """Which optimizer to use and its hyper-parameters (the schedule lives in ScheduleConfig)."""

    name: Literal["sgd", "momentum", "nesterov", "adam", "adamw", "lamb"] = "adamw"
    """Optimizer: sgd, momentum (SGD + heavy ball), nesterov, adam (L2 decay), adamw (decoupled decay), lamb."""
    lr: float = 3e-4
    """Peak learning rate (the schedule multiplies it)."""
    weight_decay: float = 0.1
    """Weight decay for matrices; biases, norms and (by default) embeddings get none. L2 for sgd/adam, decoupled for adamw/lamb."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam/AdamW/LAMB decay rates of the first and second moment estimates."""
    eps: float = 1e-8
    """Adam/AdamW/LAMB term added to the root of the second moment, for numerical stability."""
    momentum: float = 0.9
    """Momentum factor for the momentum and nesterov optimizers."""
    decay_embeddings: bool = False
    """Apply weight decay to nn.Embedding weights (and any weight tied to them) too."""
    fused: bool | None = None
    """Use torch's fused kernels: None picks them when every parameter is on CUDA, true forces, false uses plain loops."""

    def validate(self) -> None:
        """Raise ValueError on values no optimizer can run with."""
        if self.name not in OPTIMIZERS:
            raise ValueError(f"name: expected one of {', '.join(OPTIMIZERS)}, found {self.name!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: expected a finite number > 0, found {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a finite number >= 0, found {self.weight_decay}")
        if len(self.betas) != 2:
            raise ValueError(f"betas: expected two numbers, found {self.betas!r}")
        for i, b in enumerate(self.betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"betas[{i}]: expected a number in [0, 1), found {b}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps: expected a finite number > 0, found {self.eps}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: expected a number in [0, 1), found {self.momentum}")
        if self.name == "nesterov" and self.momentum == 0:
            raise ValueError("momentum: nesterov needs momentum > 0, found 0")


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False,
                 only: set[str] | None = None) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed group and a non-decayed one.

    Decayed: matrices (``p.ndim >= 2``) that are not embeddings. Not decayed: biases, norm weights
    and other 1-D (or 0-D) tensors, and ``nn.Embedding`` weights (found by module type, so a head
    tied to the embedding counts as one) unless ``decay_embeddings``. Order follows
    ``model.named_parameters()``; empty groups are dropped; each group has a ``"names"`` list. ``only``: keep
    just these parameter names (a ZeRO process's share) and keep both groups even when empty, so group i means
    the same on every process.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay: tuple[list[str], list[nn.Parameter]] = ([], [])
    no_decay: tuple[list[str], list[nn.Parameter]] = ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad or (only is not None and name not in only):
            continue
        is_embedding = id(p) in embeddings
        wants = p.ndim >= 2 and (decay_embeddings or not is_embedding)
        names, params = decay if wants else no_decay
        names.append(name)
        params.append(p)
    groups = []
    for (names, params), wd in ((decay, weight_decay), (no_decay, 0.0)):
        if params or only is not None:
            groups.append({"params": params, "weight_decay": wd, "names": names})
    return groups


def _kernel_kwargs(cfg: OptimConfig, groups: list[dict[str, Any]]) -> dict[str, Any]:
    """``fused``/``foreach`` arguments for torch's optimizers from ``cfg.fused``."""
    if cfg.fused is False:
        return {"fused": False, "foreach": False}
    if cfg.fused is True:
        return {"fused": True}
    params = [p for g in groups for p in g["params"]]
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return {"fused": True}
    return {}  # torch's default: foreach on accelerators, a plain loop on CPU


def build_optimizer(model: nn.Module, cfg: OptimConfig, only: set[str] | None = None) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg`` over ``param_groups(model, ...)``.

    Weight decay differs by family: ``sgd``/``momentum``/``nesterov``/``adam`` use torch's L2
    form (``g += wd * x`` before the update, so with Adam the decay is rescaled by the adaptive
    denominator), while ``adamw`` and ``lamb`` decouple it (Loshchilov & Hutter, 2019:
    ``x -= lr * wd * x`` beside the Adam step; LAMB adds ``wd * x`` to the update direction
    before its trust ratio). Either way only the matrix group decays.
    """
    cfg.validate()
    groups = param_groups(model, cfg.weight_decay, cfg.decay_embeddings, only)
    if not any(g["params"] for g in groups) and only is None:
        raise ValueError("build_optimizer: the model has no trainable parameters (requires_grad=True)")
    if cfg.name == "lamb":
        return LAMB(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    kernels = _kernel_kwargs(cfg, groups)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.0, **kernels)
    if cfg.name in ("momentum", "nesterov"):
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.name == "nesterov", **kernels)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kernels)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kernels)


class LAMB(torch.optim.Optimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al., 2019, "Large Batch
    Optimization for Deep Learning: Training BERT in 76 minutes", Algorithm 2).

    Per tensor ``x`` with gradient ``g`` at step ``t`` (1-based):
    ``m = β1 m + (1-β1) g``; ``v = β2 v + (1-β2) g²``; ``m̂ = m / (1-β1^t)``;
    ``v̂ = v / (1-β2^t)``; ``r = m̂ / (√v̂ + ε) + λ x``;
    ``x ← x - η · φ(‖x‖)/‖r‖ · r`` with φ the identity and the trust ratio set to 1 when either
    norm is 0. The state (``step``, ``exp_avg``, ``exp_avg_sq``) round-trips through
    ``state_dict()`` / ``load_state_dict()``, so resume is exact.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"LAMB: lr must be > 0, found {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LAMB: betas must lie in [0, 1), found {betas}")
        if not eps > 0:
            raise ValueError(f"LAMB: eps must be > 0, found {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"LAMB: weight_decay must be >= 0, found {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one LAMB step; ``closure`` (optional) re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                g, x = p.grad, p
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(x, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(x, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1 ** t)
                v_hat = v / (1 - beta2 ** t)
                r = m_hat / (v_hat.sqrt() + eps)
                if wd != 0:
                    r.add_(x, alpha=wd)
                x_norm = torch.linalg.vector_norm(x)
                r_norm = torch.linalg.vector_norm(r)
                ratio = torch.where((x_norm > 0) & (r_norm > 0), x_norm / r_norm,
                                    torch.ones_like(x_norm))
                p.sub_(lr * ratio * r)
        return loss
