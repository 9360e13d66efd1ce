"""LoRA (Hu et al., 2021, eq. 3: h = W₀x + (α/r)·BAx) and QLoRA (Dettmers et al., 2023: W₀ frozen in NF4),
with adapters saved and loaded in the PEFT layout (adapter_config.json + adapter_model.safetensors)."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import write_file, write_text
from ..models import hf
from .quantize import NF4Linear, replace_module, quantize_nf4, to_linear

__all__ = ["LoraConfig", "LoRALinear", "apply_lora", "set_adapter", "merge_lora", "unmerge_lora", "unwrap_lora",
           "adapter_names", "save_adapter", "load_adapter", "route_adapters"]

PEFT_PREFIX = "base_model.model."
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
    """Linear layers to adapt: a last name component (q, up, score) or an fnmatch pattern of the full name (blocks.*.attn.q)."""
    modules_to_save: list[str] | None = None
    """Other modules trained in full and saved with the adapter (PEFT modules_to_save); None = score for classifier heads."""
    quantize: Literal["none", "nf4"] = "none"
    """QLoRA: 'nf4' stores every linear layer of the blocks frozen in 4-bit NormalFloat; embeddings, heads and norms stay."""
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


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers LoRA can wrap (not the adapters inside existing wrappers)."""
    inside = tuple(n + "." for n, _ in lora_layers(model))
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, NF4Linear, LoRALinear)) and not (inside and n.startswith(inside))]


def _match(names: list[str], targets: list[str]) -> list[str]:
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
    chosen = _match(_linear_names(model), cfg.targets)
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
    keep = cfg.modules_to_save if cfg.modules_to_save is not None else (["score"] if head == "classifier" else [])
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


# ---- PEFT layout -----------------------------------------------------------------------------------------------

def _hf_name(cfg, ours: str) -> str | None:
    """The Hugging Face module name (with the model prefix) of our module `ours`, or None if it has none."""
    fam = hf._family_names(cfg.family)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", ours)
    key = f"blocks.{{i}}.{m[2]}" if m else ours
    if key in hf._NAMES[fam]:
        name = (hf._BODY_PREFIX[fam] if cfg.head != "none" else "") + hf._NAMES[fam][key]
    elif key in hf._HEADS[fam]:
        name = hf._HEADS[fam][key]
    else:
        return None
    return name.replace("{i}", m[1]) if m else name


def _peft_targets(chosen: list[str], linears: list[str]) -> list[str]:
    """Shortest dotted suffixes selecting exactly `chosen` among `linears` (PEFT matches a module when its name
    equals an entry or ends with '.' + entry): ['q_proj', ...], or ['output.dense', ...] where names collide."""
    out: list[str] = []
    for full in chosen:
        if any(full == s or full.endswith("." + s) for s in out):
            continue
        parts = full.split(".")
        for k in range(1, len(parts) + 1):
            s = ".".join(parts[-k:])
            if all(n in chosen for n in linears if n == s or n.endswith("." + s)):
                break
        out.append(s)
    return out


def _model_cfg(model: nn.Module):
    if not hasattr(model, "cfg") or not hasattr(model.cfg, "family"):
        raise TypeError(f"the PEFT layout needs an lmforge Transformer (with .cfg), found {type(model).__name__}")
    return model.cfg


def _task_type(head: str) -> str:
    return {"lm": "CAUSAL_LM", "classifier": "SEQ_CLS"}.get(head, "FEATURE_EXTRACTION")


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` (and trainable non-LoRA modules, as PEFT modules_to_save) in the PEFT layout."""
    cfg = _model_cfg(model)
    layers = [(n, w) for n, w in lora_layers(model) if name in w.lora_A]
    if not layers:
        raise ValueError(f"no adapter {name!r} to save; adapters: {adapter_names(model)}")
    fam = hf._family_names(cfg.family)
    if fam == "gpt2" and any(n.rsplit(".", 1)[-1] in ("q", "k", "v") for n, _ in layers):
        raise ValueError("GPT-2 fuses q, k, v into one Conv1D (c_attn): PEFT cannot hold separate q/k/v adapters; "
                         "target o, up and down instead")
    hyper = {(w.lora_A[name].out_features, w.alpha[name], getattr(w.lora_dropout[name], "p", 0.0)) for _, w in layers}
    if len(hyper) > 1:
        raise ValueError(f"adapter {name!r} has layers with different (rank, alpha, dropout) {sorted(hyper)}")
    (r, alpha, dropout), = hyper
    tensors, hf_chosen = {}, []
    for n, w in layers:
        hn = _hf_name(cfg, n)
        if hn is None:
            raise ValueError(f"LoRA layer {n} has no Hugging Face name in a {cfg.family} model")
        hf_chosen.append(hn)
        tensors[f"{PEFT_PREFIX}{hn}.lora_A.weight"] = w.lora_A[name].weight
        tensors[f"{PEFT_PREFIX}{hn}.lora_B.weight"] = w.lora_B[name].weight
    saved = []
    for pn, p in model.named_parameters():
        if p.requires_grad and ".lora_" not in pn:
            module, leaf = pn.rsplit(".", 1)
            hn = _hf_name(cfg, module)
            if hn is None or isinstance(model.get_submodule(module), LoRALinear) or (
                    fam == "gpt2" and hf._GPT2_CONV1D.search(pn)):
                raise ValueError(f"trainable parameter {pn} cannot be saved as a PEFT module_to_save; freeze it")
            tensors[f"{PEFT_PREFIX}{hn}.{leaf}"] = p
            if hn not in saved:
                saved.append(hn)
    linears = [h for h in (_hf_name(cfg, n) for n in _linear_names(model)) if h]
    conf = dict(peft_type="LORA", task_type=_task_type(cfg.head), r=r, lora_alpha=alpha, lora_dropout=dropout,
                target_modules=_peft_targets(hf_chosen, linears), bias="none", fan_in_fan_out=fam == "gpt2",
                modules_to_save=saved or None, base_model_name_or_path=base_model_name_or_path, revision=None,
                init_lora_weights=True, use_rslora=False, use_dora=False, inference_mode=True,
                layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={})
    from safetensors.torch import save_file

    dst = Path(path)
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_file(dst / "adapter_model.safetensors", lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
    write_text(dst / "adapter_config.json", json.dumps(conf, indent=2) + "\n")
    return dst


# adapter_config.json options that change the computation and that we do not implement: must be unset or false
_UNSUPPORTED = ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                "layer_replication", "lora_bias")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(\.[^.]+)?\.weight$")


def _read_adapter(folder: Path, allow_pickle: bool) -> tuple[dict, dict[str, Tensor], Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} not found")
    conf_file = folder / "adapter_config.json"
    if not conf_file.exists():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    conf = hf.read_config(conf_file)
    if conf.get("peft_type") != "LORA":
        raise ValueError(f"{conf_file}: peft_type {conf.get('peft_type')!r} is not supported; expected 'LORA'")
    for key in _UNSUPPORTED:
        if conf.get(key):
            raise ValueError(f"{conf_file}: {key}={conf[key]!r} is not supported (expected it unset or false)")
    if conf.get("bias", "none") != "none":
        raise ValueError(f"{conf_file}: bias={conf['bias']!r} is not supported; expected 'none'")
    weights = folder / "adapter_model.safetensors"
    if weights.exists():
        from safetensors.torch import load_file

        return conf, load_file(str(weights)), weights
    if (folder / "adapter_model.bin").exists():
        from ..models.loading import read_pickle

        return conf, read_pickle([folder / "adapter_model.bin"], allow_pickle), folder / "adapter_model.bin"
    raise FileNotFoundError(f"{folder}: no adapter_model.safetensors")


def _hf_to_ours(model: nn.Module) -> dict[str, str]:
    """HF module name -> our module name; body modules also without / with the body prefix (model., bert., ...),
    so adapters trained on a bare body (FEATURE_EXTRACTION) and on a model with a head both load."""
    cfg = _model_cfg(model)
    prefix = hf._BODY_PREFIX[hf._family_names(cfg.family)]
    out: dict[str, str] = {}
    for n, _ in model.named_modules():
        hn = _hf_name(cfg, n) if n else None
        if hn:
            out[hn] = n
            if cfg.head == "none" or hn.startswith(prefix):  # a body module, not a head
                out.setdefault(hn.removeprefix(prefix), n)
                out.setdefault(prefix + hn.removeprefix(prefix), n)
    return out


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", trainable: bool = False,
                 allow_pickle: bool = False) -> nn.Module:
    """Load a PEFT LoRA adapter folder as adapter `name` (added to the model if absent) and make it active."""
    conf, tensors, file = _read_adapter(Path(path), allow_pickle)
    ours = _hf_to_ours(model)
    lora: dict[str, dict[str, Tensor]] = {}
    full: dict[str, Tensor] = {}
    for key, t in tensors.items():
        rest = key.removeprefix(PEFT_PREFIX)
        m = _LORA_KEY.match(rest)
        module, leaf = (m["module"], None) if m else rest.rsplit(".", 1)
        if module not in ours:
            hint = "; GPT-2's fused c_attn (q, k, v) cannot be split" if module.endswith("c_attn") else ""
            raise ValueError(f"{file}: key {key}: module {module!r} not found in this {model.cfg.family} model "
                             f"(expected names like {list(ours)[:4]}){hint}")
        if not m and leaf.startswith("lora_"):
            raise ValueError(f"{file}: key {key}: only LoRA on linear layers is supported (lora_A / lora_B)")
        if m:
            lora.setdefault(ours[module], {})[m["ab"]] = t
        else:
            full[f"{ours[module]}.{leaf}"] = t
    if not lora:
        raise ValueError(f"{file}: no lora_A / lora_B tensors found")
    if name not in adapter_names(model):
        apply_lora(model, LoraConfig(rank=int(conf["r"]), alpha=float(conf["lora_alpha"]),
                                     dropout=float(conf.get("lora_dropout") or 0.0), targets=sorted(lora),
                                     modules_to_save=[]), name)
    layers = {n: w for n, w in lora_layers(model) if name in w.lora_A}
    if set(layers) != set(lora):
        raise ValueError(f"{file}: adapter covers {sorted(lora)[:4]}..., but adapter {name!r} of the model has "
                         f"layers {sorted(layers)[:4]}...")
    targets = {f"{n}.lora_{ab}.{name}.weight": t for n, d in lora.items() for ab, t in d.items()}
    for pn, t in {**targets, **full}.items():
        p = model.get_parameter(pn)
        if p.shape != t.shape:
            raise ValueError(f"{file}: tensor for {pn} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t)
        p.requires_grad_(trainable)
    return set_adapter(model, name)
