"""LoRA (Hu et al., 2021, eq. 3: h = W₀x + (α/r)·BAx) and QLoRA (Dettmers et al., 2023: W₀ frozen in NF4),
as a model transform. Saving and loading adapters in the PEFT layout is `transforms.peft`."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.transformer import TASK_HEADS
from .quantize import NF4Linear, replace_module, quantize_nf4, to_linear

__all__ = ["LoraConfig", "LoRALinear", "apply_lora", "set_adapter", "merge_lora", "unmerge_lora", "unwrap_lora",
           "adapter_names", "route_adapters", "lora_layers", "linear_names", "match_targets"]

_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class LoraConfig:
    """Low-rank adapters on linear layers; with quantize='nf4' the frozen base is stored in 4 bits (QLoRA)."""

    rank: int = 8
    """Rank r of the update B·A."""
    alpha: float = 16.0
    """Scale of the update: it is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training."""
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    """Linear layers to adapt: a last name component (q, up, score) or an fnmatch pattern of the full name
    (blocks.*.attn.q)."""
    modules_to_save: list[str] | None = None
    """Other modules trained in full and saved with the adapter (PEFT modules_to_save); None = the task head's
    new module (score for classifiers, qa_outputs for span heads)."""
    quantize: Literal["none", "nf4"] = "none"
    """QLoRA: 'nf4' stores every linear layer of the blocks frozen in 4-bit NormalFloat; embeddings, heads and
    norms stay."""
    double_quant: bool = True
    """QLoRA: quantize the NF4 block scales too (8-bit), saving about 0.37 bit per weight."""
    quant_block_size: int = 64
    """QLoRA: weights sharing one NF4 scale."""

    def validate(self) -> None:
        """Raise ValueError on values LoRA cannot run with."""
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected an integer >= 1, found {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha: expected a finite number > 0, found {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1), found {self.dropout}")
        if not self.targets:
            raise ValueError("targets: expected at least one layer name or pattern, found an empty list")
        if self.quantize not in ("none", "nf4"):
            raise ValueError(f"quantize: expected 'none' or 'nf4', found {self.quantize!r}")
        if self.quant_block_size not in _BLOCK_SIZES:
            raise ValueError(f"quant_block_size: expected one of {_BLOCK_SIZES}, found {self.quant_block_size}")


class LoRALinear(nn.Module):
    """A linear layer (nn.Linear or NF4Linear) plus named low-rank adapters: y = base(x) + s·B(A(dropout(x))).

    The wrapper's `weight` and `bias` are the base layer's own tensors (it shares the base's parameter and buffer
    dicts), so state-dict keys stay `<name>.weight`; adapters add `<name>.lora_A.<adapter>.weight` etc."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.lora_A = nn.ModuleDict()  # adapter -> Linear(in, r)
        self.lora_B = nn.ModuleDict()  # adapter -> Linear(r, out)
        self.lora_dropout = nn.ModuleDict()
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active: str | dict[str, Tensor] | None = None
        """Adapter added in forward; None computes the base layer only; {adapter: row indices} chooses an adapter
        per row of the flattened input (the inference engine batches requests for different adapters)."""
        self.merged: str | None = None
        """Adapter whose update is currently added into the base weight."""
        self.set_base(base)

    def set_base(self, base: nn.Module) -> None:
        # the base is not a child module: its tensors are registered on the wrapper itself, under the same names
        d = self.__dict__
        d["base_layer"] = base
        d["_parameters"], d["_buffers"] = base._parameters, base._buffers
        d["_non_persistent_buffers_set"] = base._non_persistent_buffers_set

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """A new adapter initialised as PEFT does (A Kaiming-uniform, B zero), so it starts as the identity."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        w = self.base_layer.weight  # float, or the packed codes of an NF4 base: adapters are at least fp32
        kw = dict(device=w.device, dtype=torch.promote_types(w.dtype, torch.float32) if w.is_floating_point()
                  else torch.float32)
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.alpha[name], self.scaling[name] = float(alpha), alpha / rank

    def delta_weight(self, name: str) -> Tensor:
        """The update s·B·A (out, in) of adapter `name`, in fp32."""
        return (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()) * self.scaling[name]

    @torch.no_grad()
    def merge(self) -> None:
        """Add the active adapter's update into the base weight. An NF4 base is dequantized and replaced by a
        plain nn.Linear in its compute dtype (re-quantizing would lose the update); unmerge keeps it float."""
        if self.active is None or self.merged == self.active:
            return
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is merged; unmerge it before merging {self.active!r}")
        delta = self.delta_weight(self.active)
        if isinstance(self.base_layer, NF4Linear):
            self.set_base(to_linear(self.base_layer, delta))
        else:
            self.weight += delta.to(self.weight.dtype)
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter's update from the base weight."""
        if self.merged is not None:
            self.weight -= self.delta_weight(self.merged).to(self.weight.dtype)
            self.merged = None

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., out)
        name = self.active
        if name is None or name == self.merged:
            return y
        if isinstance(name, dict):
            flat, out = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])  # (N, in), (N, out) views
            for n, rows in name.items():
                if n in self.lora_A:
                    a, b = self.lora_A[n].weight.to(x.dtype), self.lora_B[n].weight.to(x.dtype)
                    out.index_add_(0, rows, F.linear(F.linear(flat[rows], a), b) * self.scaling[n])
            return y
        h = self.lora_dropout[name](x)
        a, b = self.lora_A[name].weight.to(h.dtype), self.lora_B[name].weight.to(h.dtype)
        return y + F.linear(F.linear(h, a), b) * self.scaling[name]  # (..., r) -> (..., out)

    def _apply(self, fn, recurse: bool = True):
        self.base_layer._apply(fn, recurse=False)  # the shared tensors, and an NF4 base's quantization state
        if recurse:
            for child in self.children():
                child._apply(fn)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.base_layer._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        own = {k: v for k, v in state_dict.items() if k[len(prefix):].split(".", 1)[0] not in self._modules}
        self.base_layer._load_from_state_dict(own, prefix, *args)

    def extra_repr(self) -> str:
        ranks = {n: a.out_features for n, a in self.lora_A.items()}
        return f"base={self.base_layer!r}, ranks={ranks}, active={self.active!r}, merged={self.merged!r}"


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRA wrapper in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers LoRA can wrap (not the adapters inside existing wrappers): what `targets` match,
    and what a saved adapter's target_modules must single out."""
    inside = tuple(n + "." for n, _ in lora_layers(model))
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, NF4Linear, LoRALinear)) and not (inside and n.startswith(inside))]


def match_targets(names: list[str], targets: list[str] | tuple[str, ...]) -> list[str]:
    """The linear-layer `names` LoRA adapts: a target equal to the last name component (q, up, score) or an
    fnmatch pattern of the full name (blocks.*.attn.q). ValueError when none match or lm_head does."""
    targets = list(targets)
    chosen = [n for n in names if any(t == n.rsplit(".", 1)[-1] or fnmatch.fnmatchcase(n, t) for t in targets)]
    if not chosen:
        raise ValueError(f"LoRA targets {targets} match no linear layer; available: {names[:8]}"
                         f"{f' ... ({len(names)} in all)' if len(names) > 8 else ''}")
    if "lm_head" in chosen:
        raise ValueError("LoRA on lm_head is not supported: the LM head is applied through its weight "
                         "(fused cross-entropy), not as a module; drop 'lm_head' from targets")
    return chosen


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on the model's LoRA layers, in the order they were added."""
    return list(dict.fromkeys(a for _, m in lora_layers(model) for a in m.lora_A))


def apply_lora(model: nn.Module, cfg: LoraConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to the linear layers matching `cfg.targets` (in place), freeze every other parameter
    except `cfg.modules_to_save`, and make the adapter active. A second call adds a second adapter."""
    cfg.validate()
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists; adapters: {adapter_names(model)}")
    chosen = match_targets(linear_names(model), cfg.targets)
    if cfg.quantize == "nf4":
        quantize_nf4(model, double_quant=cfg.double_quant, block_size=cfg.quant_block_size)
        for _, w in lora_layers(model):  # bases wrapped by an earlier adapter
            if type(w.base_layer) is nn.Linear and w.merged is None:
                w.set_base(NF4Linear.from_linear(w.base_layer, cfg.double_quant, cfg.quant_block_size))
    for n in chosen:
        layer = model.get_submodule(n)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            replace_module(model, n, layer)
        layer.add_adapter(name, cfg.rank, cfg.alpha, cfg.dropout)
    model.requires_grad_(False)
    for _, w in lora_layers(model):
        if name in w.lora_A:
            w.lora_A[name].requires_grad_(True)
            w.lora_B[name].requires_grad_(True)
    head = getattr(getattr(model, "cfg", None), "head", None)
    keep = cfg.modules_to_save if cfg.modules_to_save is not None else \
        ([TASK_HEADS[head]] if head in TASK_HEADS else [])
    for n in keep:
        if n not in dict(model.named_modules()):
            raise ValueError(f"modules_to_save: no module {n!r} in the model (e.g. score, pooler, lm_head)")
        model.get_submodule(n).requires_grad_(True)
    set_adapter(model, name)
    return model


def set_adapter(model: nn.Module, name: str | None) -> nn.Module:
    """Make adapter `name` the one each LoRA layer adds (layers without it compute the base); None = base only."""
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"no adapter {name!r}; adapters: {adapter_names(model)}")
    for n, w in lora_layers(model):
        if w.merged is not None and w.merged != name:
            raise ValueError(f"{n}: adapter {w.merged!r} is merged; call unmerge_lora(model) before switching")
        w.active = name if name in w.lora_A else None
    return model


def route_adapters(model: nn.Module, rows: dict[str, Tensor]) -> None:
    """Per-row adapters for the next forward over a flattened batch (B * T rows): {adapter: row indices};
    rows not listed compute the base. Merged adapters cannot be routed (unmerge first)."""
    for n, w in lora_layers(model):
        if w.merged is not None:
            raise ValueError(f"{n}: adapter {w.merged!r} is merged; call unmerge_lora(model) before routing")
        w.active = rows or None


def merge_lora(model: nn.Module) -> nn.Module:
    """Add each layer's active adapter into its base weight (forward no longer adds it separately)."""
    for _, w in lora_layers(model):
        w.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (an NF4 base merged into a float weight stays float)."""
    for _, w in lora_layers(model):
        w.unmerge()
    return model


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by its base layer, dropping the adapters: merge first to keep the active one."""
    for n, w in lora_layers(model):
        if w.active is not None and w.merged != w.active:
            raise ValueError(f"{n}: active adapter {w.active!r} is not merged; call merge_lora(model) first, "
                             "or set_adapter(model, None) to drop it")
        replace_module(model, n, w.base_layer.train(w.training))
    return model
