"""Adapters in the PEFT folder layout (adapter_config.json + adapter_model.safetensors), and models from such
folders.

One place for the on-disk format of every parameter-efficient method: LoRA (`save_adapter` / `load_adapter`,
read and written the way `peft` does, so each loads the other's), prompt tuning (`save_prompt` / `load_prompt`,
peft_type PROMPT_TUNING) and bottleneck adapters (`save_adapters` / `load_adapters`, peft_type BOTTLENECK, an
lmforge type). `load` is `models.loading.load` that also resolves an adapter folder to its base model with the
adapter applied; it is `lmforge.load`. The transforms themselves stay in lora.py, prompt_tuning.py, adapters.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import write_file, write_text
from ..errors import InputError
from ..models import hf, loading
from ..models.loading import read_pickle, resolve
from ..models.transformer import ModelConfig, Transformer
from ..tokenizer.base import Tokenizer
from .adapters import AdapterConfig, apply_adapters
from .lora import LoraConfig, LoRALinear, adapter_names, apply_lora, linear_names, lora_layers, set_adapter
from .prompt_tuning import PromptTuning
from .quant import is_quantized_folder, load_quantized

__all__ = ["load", "save_adapter", "load_adapter", "save_prompt", "load_prompt", "save_adapters", "load_adapters",
           "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
"""What `peft` puts in front of the model's own module names in adapter_model.safetensors."""


def load(source: str | os.PathLike, *, dtype: torch.dtype | str | None = None, device: str = "cpu",
         head: str | None = None, num_labels: int | None = None,
         allow_pickle: bool = False) -> tuple[Transformer, Tokenizer | None]:
    """Load (model, tokenizer) as `models.loading.load` does, or from an adapter folder (adapter_config.json and
    no config.json): its base model with the adapter applied (`head`/`num_labels` come from the adapter then), or
    from a quantized folder (`quantization_config.quant_method` "lmforge"): its QuantLinears with the saved codes.

    This is `lmforge.load`: the model loader knows no adapter types, so the resolution lives here."""
    path = resolve(source)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        return _load_adapter_folder(path, dtype=dtype, device=device, allow_pickle=allow_pickle)
    if path.is_dir() and is_quantized_folder(path):  # codes and scales of QuantLinears (quant.save_quantized)
        if head is not None or num_labels is not None:
            raise InputError(f"{path}: a quantized model keeps its head; head/num_labels cannot be replaced")
        return load_quantized(path, dtype=dtype, device=device)
    return loading.load(path, dtype=dtype, device=device, head=head, num_labels=num_labels,
                        allow_pickle=allow_pickle)


def _load_adapter_folder(path: Path, **kw: Any) -> tuple[Transformer, Tokenizer | None]:
    """An adapter folder (PEFT layout): its base model (`base_model_name_or_path`) with the adapter applied."""
    meta = hf.read_config(path / "adapter_config.json")
    base = meta.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{path / 'adapter_config.json'}: no base_model_name_or_path, so the base model is unknown; "
                         f"load the base with lmforge.load and apply the adapter to it")
    kind = meta.get("peft_type")
    head, num_labels = None, None
    if meta.get("task_type") == "SEQ_CLS":  # the classifier's size: from the saved head (PEFT's modules_to_save)
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys() if k.endswith(("score.weight", "classifier.weight"))]
        head, num_labels = "classifier", (shapes[0][0] if shapes else None)
    elif meta.get("task_type") == "QUESTION_ANS":
        head = "span"
    model, tok = load(base, head=head, num_labels=num_labels, **kw)
    if kind == "LORA":
        load_adapter(model, path)
    elif kind == "PROMPT_TUNING":
        load_prompt(model, path)
    elif kind == "BOTTLENECK":
        load_adapters(model, path)
    else:
        raise InputError(f"{path / 'adapter_config.json'}: peft_type {kind!r} is not supported (expected LORA, "
                         f"PROMPT_TUNING or BOTTLENECK)")
    if meta.get("id2label"):
        model.cfg.id2label = {int(k): v for k, v in meta["id2label"].items()}
    if (path / "tokenizer.json").exists():
        tok = Tokenizer.from_dir(path)
    return model.eval(), tok


def _task_type(head: str) -> str:
    """PEFT's task_type for a model head."""
    return {"lm": "CAUSAL_LM", "classifier": "SEQ_CLS", "span": "QUESTION_ANS"}.get(head, "FEATURE_EXTRACTION")


# ---- LoRA --------------------------------------------------------------------------------------------------------

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


def _model_cfg(model: nn.Module) -> ModelConfig:
    """The model's config, which names its modules the Hugging Face way; TypeError for a model without one."""
    if not hasattr(model, "cfg") or not hasattr(model.cfg, "family"):
        raise TypeError(f"the PEFT layout needs an lmforge Transformer (with .cfg), found {type(model).__name__}")
    return model.cfg


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` (and trainable non-LoRA modules, as PEFT modules_to_save) in the PEFT layout."""
    cfg = _model_cfg(model)
    layers = [(n, w) for n, w in lora_layers(model) if name in w.lora_A]
    if not layers:
        raise ValueError(f"no adapter {name!r} to save; adapters: {adapter_names(model)}")
    if cfg.family == "gpt2" and any(n.rsplit(".", 1)[-1] in ("q", "k", "v") for n, _ in layers):
        raise ValueError("GPT-2 fuses q, k, v into one Conv1D (c_attn): PEFT cannot hold separate q/k/v adapters; "
                         "target o, up and down instead")
    hyper = {(w.lora_A[name].out_features, w.alpha[name], getattr(w.lora_dropout[name], "p", 0.0)) for _, w in layers}
    if len(hyper) > 1:
        raise ValueError(f"adapter {name!r} has layers with different (rank, alpha, dropout) {sorted(hyper)}")
    (r, alpha, dropout), = hyper
    tensors, hf_chosen = {}, []
    for n, w in layers:
        hn = hf.hf_module_name(cfg, n)
        if hn is None:
            raise ValueError(f"LoRA layer {n} has no Hugging Face name in a {cfg.family} model")
        hf_chosen.append(hn)
        tensors[f"{PEFT_PREFIX}{hn}.lora_A.weight"] = w.lora_A[name].weight
        tensors[f"{PEFT_PREFIX}{hn}.lora_B.weight"] = w.lora_B[name].weight
    saved = []
    for pn, p in model.named_parameters():
        if p.requires_grad and ".lora_" not in pn:
            module, leaf = pn.rsplit(".", 1)
            hn = hf.hf_module_name(cfg, module)
            if hn is None or isinstance(model.get_submodule(module), LoRALinear) or \
                    hf.stored_transposed(cfg.family, pn):
                raise ValueError(f"trainable parameter {pn} cannot be saved as a PEFT module_to_save; freeze it")
            tensors[f"{PEFT_PREFIX}{hn}.{leaf}"] = p
            if hn not in saved:
                saved.append(hn)
    linears = [h for h in (hf.hf_module_name(cfg, n) for n in linear_names(model)) if h]
    conf = dict(peft_type="LORA", task_type=_task_type(cfg.head), r=r, lora_alpha=alpha, lora_dropout=dropout,
                target_modules=_peft_targets(hf_chosen, linears), bias="none", fan_in_fan_out=cfg.family == "gpt2",
                modules_to_save=saved or None, base_model_name_or_path=base_model_name_or_path, revision=None,
                init_lora_weights=True, use_rslora=False, use_dora=False, inference_mode=True,
                layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={})
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
        return conf, load_file(str(weights)), weights
    if (folder / "adapter_model.bin").exists():
        return conf, read_pickle([folder / "adapter_model.bin"], allow_pickle), folder / "adapter_model.bin"
    raise FileNotFoundError(f"{folder}: no adapter_model.safetensors")


def _hf_to_ours(model: nn.Module) -> dict[str, str]:
    """HF module name -> our module name; body modules also without / with the body prefix (model., bert., ...),
    so adapters trained on a bare body (FEATURE_EXTRACTION) and on a model with a head both load."""
    cfg = _model_cfg(model)
    prefix = hf.body_prefix(cfg.family)
    out: dict[str, str] = {}
    for n, _ in model.named_modules():
        hn = hf.hf_module_name(cfg, n) if n else None
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


# ---- prompt tuning -----------------------------------------------------------------------------------------------

def save_prompt(model: nn.Module, path: str | Path, base_model_name_or_path: str | None = None,
                init_text: str | None = None, extra: dict[str, Tensor] | None = None) -> Path:
    """Write the virtual tokens in the PEFT layout (`extra`: other trained tensors, e.g. a new classifier head,
    under their lmforge names)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    emb = model.prompt.embedding.detach().float().cpu().contiguous()
    cfg = model.cfg
    meta = {"peft_type": "PROMPT_TUNING", "task_type": _task_type(cfg.head), "num_virtual_tokens": emb.shape[0],
            "token_dim": emb.shape[1], "num_transformer_submodules": 1, "num_attention_heads": cfg.num_heads,
            "num_layers": cfg.num_layers, "prompt_tuning_init": "TEXT" if init_text else "RANDOM",
            "prompt_tuning_init_text": init_text, "tokenizer_name_or_path": base_model_name_or_path,
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}
    if cfg.id2label:
        meta["id2label"] = {str(k): v for k, v in cfg.id2label.items()}
    (path / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in (extra or {}).items()}
    save_file({"prompt_embeddings": emb, **tensors}, str(path / "adapter_model.safetensors"))
    return path


def load_prompt(model: nn.Module, path: str | Path, trainable: bool = False) -> nn.Module:
    """Attach virtual tokens saved in the PEFT layout (by us or by `peft`)."""
    path = Path(path)
    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected a prompt-tuning adapter folder in the PEFT layout")
    meta = json.loads(cfg_file.read_text())
    if meta.get("peft_type") != "PROMPT_TUNING":
        raise ValueError(f"{cfg_file}: peft_type is {meta.get('peft_type')!r}, expected 'PROMPT_TUNING'")
    sd = load_file(str(weights))
    if "prompt_embeddings" not in sd:
        raise ValueError(f"{weights}: no 'prompt_embeddings' tensor (found {sorted(sd)[:5]})")
    emb = sd["prompt_embeddings"]
    if emb.dim() != 2 or emb.shape[1] != model.cfg.hidden_size:
        raise ValueError(f"{weights}: prompt_embeddings has shape {tuple(emb.shape)}, expected (P, "
                         f"{model.cfg.hidden_size}) for this model")
    rest = {k: v for k, v in sd.items() if k != "prompt_embeddings"}
    unknown = sorted(set(rest) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"{weights}: tensors {unknown[:4]} are not part of this model")
    model.load_state_dict(rest, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.prompt = PromptTuning(emb.float().to(model.embed.tokens.weight.device))
    model.prompt.embedding.requires_grad_(trainable)
    return model


# ---- bottleneck adapters -----------------------------------------------------------------------------------------

def save_adapters(model: nn.Module, path: str | Path, cfg: AdapterConfig,
                  base_model_name_or_path: str | None = None, extra: dict[str, Tensor] | None = None) -> Path:
    """Write the adapter weights (our parameter names; `extra`: other trained tensors such as a new classifier
    head) and an `adapter_config.json` (peft_type BOTTLENECK, an lmforge type: `peft` has no bottleneck
    adapters) next to each other, in the PEFT folder layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v for k, v in model.state_dict().items() if ".adapter_" in k}
    sd = {k: v.detach().float().cpu().contiguous() for k, v in {**sd, **(extra or {})}.items()}
    meta = {"peft_type": "BOTTLENECK", "task_type": _task_type(model.cfg.head), "bottleneck": cfg.bottleneck,
            "activation": cfg.activation, "places": list(cfg.places),
            "base_model_name_or_path": base_model_name_or_path}
    if getattr(model.cfg, "id2label", None):
        meta["id2label"] = {str(k): v for k, v in model.cfg.id2label.items()}
    (path / "adapter_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_file(sd, str(path / "adapter_model.safetensors"))
    return path


def load_adapters(model: nn.Module, path: str | Path, trainable: bool = False) -> nn.Module:
    """Add the bottleneck adapters saved in `path` to `model`."""
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
