"""Bottleneck adapters (Houlsby et al.): h + up(act(down(h))) after the attention and MLP output projections.

`apply_adapters` wraps each block's attention output projection (`attn.o`) and MLP down projection
(`mlp.down`) in an `AdaptedLinear` that keeps the base `weight`/`bias` names (base checkpoints load unchanged)
and adds a small residual bottleneck on its output, before the block's residual sum (and, in post-norm BERT
blocks, before the LayerNorm) — the placement of the original paper. `up` starts at zero, so a fresh adapter is
the identity and the adapted model equals the base model exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
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


def save_adapters(model: nn.Module, path: str | Path, cfg: AdapterConfig,
                  base_model_name_or_path: str | None = None, extra: dict[str, Tensor] | None = None) -> Path:
    """Write the adapter weights (our parameter names; `extra`: other trained tensors such as a new classifier
    head) and an `adapter_config.json` (peft_type BOTTLENECK, an lmforge type: `peft` has no bottleneck
    adapters) next to each other, in the PEFT folder layout."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items() if ".adapter_" in k}
    sd = {k: v.detach().float().cpu().contiguous() for k, v in {**sd, **(extra or {})}.items()}
    task = {"lm": "CAUSAL_LM", "classifier": "SEQ_CLS"}.get(model.cfg.head, "FEATURE_EXTRACTION")
    meta = {"peft_type": "BOTTLENECK", "task_type": task, "bottleneck": cfg.bottleneck,
            "activation": cfg.activation, "places": list(cfg.places),
            "base_model_name_or_path": base_model_name_or_path}
    if getattr(model.cfg, "id2label", None):
        meta["id2label"] = {str(k): v for k, v in model.cfg.id2label.items()}
    (path / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_file(sd, str(path / "adapter_model.safetensors"))
    return path


def load_adapters(model: nn.Module, path: str | Path, trainable: bool = False) -> nn.Module:
    """Add the bottleneck adapters saved in `path` to `model`."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = json.loads((path / "adapter_config.json").read_text())
    if meta.get("peft_type") != "BOTTLENECK":
        raise ValueError(f"{path / 'adapter_config.json'}: peft_type is {meta.get('peft_type')!r}, expected "
                         f"'BOTTLENECK'")
    cfg = AdapterConfig(bottleneck=meta["bottleneck"], activation=meta["activation"], places=meta["places"])
    apply_adapters(model, cfg)
    sd = load_file(str(path / "adapter_model.safetensors"))
    names = set(model.state_dict())
    own = {k for k in names if ".adapter_" in k}
    wrong = sorted((own - set(sd)) | (set(sd) - names))
    if wrong:
        raise ValueError(f"{path / 'adapter_model.safetensors'}: tensors {wrong[:4]} do not match the adapters of "
                         f"this model")
    model.load_state_dict(sd, strict=False)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable and ".adapter_" in name)
    return model
