"""Bottleneck adapters (Houlsby et al.): h + up(act(down(h))) after the attention and MLP output projections.

`apply_adapters` wraps each block's attention output projection (`attn.o`) and MLP down projection
(`mlp.down`) in an `AdaptedLinear` that keeps the base `weight`/`bias` names (base checkpoints load unchanged)
and adds a small residual bottleneck on its output, before the block's residual sum (and, in post-norm BERT
blocks, before the LayerNorm) — the placement of the original paper. `up` starts at zero, so a fresh adapter is
the identity and the adapted model equals the base model exactly. `transforms.peft` saves and loads them
(`save_adapters`, `load_adapters`) in the PEFT folder layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@dataclass
class AdapterConfig:
    """Bottleneck adapter settings."""

    bottleneck: int = 64
    """Width of the adapter's hidden layer."""
    activation: Literal["relu", "gelu", "silu"] = "gelu"
    """Nonlinearity between the down and up projections."""
    places: list[Literal["attn", "mlp"]] = field(default_factory=lambda: ["attn", "mlp"])
    """Add an adapter after the attention block, the MLP block, or both."""

    def validate(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, found {self.bottleneck}")
        if not self.places:
            raise ValueError("places: give at least one of attn, mlp")


class AdaptedLinear(nn.Module):
    """A frozen Linear whose output passes through a residual bottleneck adapter."""

    def __init__(self, base: nn.Linear, bottleneck: int, activation: str):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the base parameters, under their own names
        out = base.out_features
        self.adapter_down = nn.Linear(out, bottleneck)
        self.adapter_up = nn.Linear(bottleneck, out)
        nn.init.normal_(self.adapter_down.weight, std=1e-2)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.weight, self.bias)  # (..., out)
        return h + self.adapter_up(_ACT[self.activation](self.adapter_down(h)))


def apply_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze `model` and add trainable bottleneck adapters to every block."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for place, parent, attr in (("attn", block.attn, "o"), ("mlp", block.mlp, "down")):
            if place in cfg.places:
                base = getattr(parent, attr)
                if isinstance(base, AdaptedLinear):
                    raise ValueError(f"{place} projection already has an adapter")
                adapted = AdaptedLinear(base, cfg.bottleneck, cfg.activation).to(base.weight.device)
                setattr(parent, attr, adapted)
    return model
