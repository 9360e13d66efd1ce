"""Weight-only integer quantization of a Transformer's block linears: the `QuantLinear` layer that every quantizer
writes (round-to-nearest here, GPTQ in gptq.py) and that the safetensors and GGUF writers read, and RTN itself.

Storage (state dict of a `QuantLinear` named `<name>`): `<name>.weight` holds the codes — 8-bit symmetric: int8
(out, in), the signed value q; 8-bit asymmetric: uint8 (out, in), q in [0, 255]; 4-bit: uint8 (out, in // 2), two
codes per byte, low nibble = even column, high nibble = odd column, codes in [0, 15] (symmetric: q = code − 8, the
nibbles of llama.cpp's Q4_0). `<name>.weight_scale` is float16 (out, in // group_size), `<name>.weight_min` (only
asymmetric) likewise. The weight is w = scale·q (symmetric) or w = scale·q + min (asymmetric), computed in float32
from the float16 scale and min — llama.cpp's Q8_0, Q4_0 and Q4_1 blocks when group_size is 32.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..models import hf
from ..models.loading import read_safetensors, save
from ..models.transformer import Transformer
from ..tokenizer.base import Tokenizer
from .quantize import NF4Linear

__all__ = ["QuantLinear", "quantize_weight", "dequantize_weight", "group_params", "quantize_values",
           "dequantize_values", "pack_int4", "unpack_int4", "quantize_rtn", "quantize_embedding", "quantization_config",
           "block_linears", "prepare_quantized", "save_quantized", "load_quantized", "is_quantized_folder",
           "QUANT_METHOD"]

QUANT_METHOD = "lmforge"
"""`quantization_config.quant_method` of a folder written by `save_quantized`."""
BITS = (4, 8)
INT8_MM_MAX_ROWS = 16
"""Below this many input rows a bf16 per-channel int8 layer uses torch's int8 weight-only matmul (decode steps)."""


def check_spec(bits: int, group_size: int | None, symmetric: bool, in_features: int) -> int:
    """The group width for a layer of `in_features` inputs (group_size None: per output channel, one group spanning
    the row); ValueError naming what was found and what was expected."""
    if bits not in BITS:
        raise ValueError(f"bits is {bits!r}, expected one of {BITS}")
    if not isinstance(symmetric, bool):
        raise ValueError(f"symmetric is {symmetric!r}, expected true or false")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size is {group_size!r}, expected a positive integer or None (per channel)")
    g = group_size or in_features
    if in_features % g:
        near = [d for d in range(max(2, g // 2), 2 * g + 1) if in_features % d == 0 and d % 2 == 0]
        raise ValueError(f"group_size {g} does not divide in_features {in_features}; expected a divisor (near it: "
                         f"{near or 'none'}) or None for one group per output channel")
    if bits == 4 and g % 2:
        raise ValueError(f"4-bit codes pack two per byte: group width {g} (in_features {in_features}) must be even")
    return g


def _levels(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer values q may take: [-2^(b-1), 2^(b-1) - 1] symmetric, [0, 2^b - 1] asymmetric."""
    return (-(1 << bits - 1), (1 << bits - 1) - 1) if symmetric else (0, (1 << bits) - 1)


def group_params(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """(scale, min | None), float16 (...,), of the groups along the last dim of w (..., g), by llama.cpp's rules
    (scale and min rounded to the nearest float16): symmetric 8-bit d = amax / 127 (Q8_0); symmetric 4-bit
    d = (the signed value of largest magnitude) / −8 (Q4_0): that value maps to −8 and the 16 levels span
    [−8, 7]·d, so a value of the opposite sign beyond 7.5·|d| clips to 7 (error ≤ |d|, elsewhere ≤ |d|/2);
    asymmetric d = (max − min) / (2^b − 1) and min (Q4_1)."""
    w = w.float()
    if symmetric and bits == 8:
        d, mn = (w.abs().amax(-1) / 127).half(), None
    elif symmetric:
        extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)  # (...,) signed
        d, mn = (extreme / -8).half(), None
    else:
        lo = w.amin(-1)
        d, mn = ((w.amax(-1) - lo) / _levels(bits, False)[1]).half(), lo.half()
    if not torch.isfinite(d).all():
        raise ValueError(f"weights up to {w.abs().max().item():.3g} in magnitude overflow a float16 scale")
    return d, mn


def quantize_values(w: Tensor, scale: Tensor, mn: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """The integer values q (float32, exact integers) nearest to w / scale (symmetric) or (w − min) / scale,
    clamped to the grid; scale and min broadcast against w (a zero scale gives q = 0)."""
    lo, hi = _levels(bits, symmetric)
    d = scale.float()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    x = w.float() if mn is None else w.float() - mn.float()
    q = torch.round(x / safe).clamp_(lo, hi)
    return torch.where(d == 0, torch.zeros_like(q), q)


def dequantize_values(q: Tensor, scale: Tensor, mn: Tensor | None) -> Tensor:
    """w = scale·q (+ min) in float32 — a multiply then an add, as llama.cpp's d·q + m."""
    w = scale.float() * q.float()
    return w if mn is None else w + mn.float()


def pack_int4(codes: Tensor) -> Tensor:
    """Codes (out, in) in [0, 15] to uint8 (out, in // 2): low nibble = even column, high nibble = odd column."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, found {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)  # (out, in // 2)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 (out, in // 2) to codes uint8 (out, in): the inverse of `pack_int4`."""
    out = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 0x0F, out=out[..., 0::2])
    torch.bitwise_right_shift(packed, 4, out=out[..., 1::2])
    return out  # (out, in)


def _to_storage(q: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Integer values q (out, in) to the stored codes of the format (see the module docstring)."""
    if bits == 8:
        return q.to(torch.int8 if symmetric else torch.uint8)
    return pack_int4(q + 8 if symmetric else q)


def _from_storage(codes: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Stored codes to the integer values q (out, in) as float32."""
    if bits == 8:
        return codes.float()
    q = unpack_int4(codes).float()
    return q - 8 if symmetric else q


def quantize_weight(w: Tensor, bits: int = 8, group_size: int | None = None,
                    symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest quantization of w (out, in): (codes, scale (out, in // g) float16, min or None), codes in
    the storage format. Codes are computed against the float16-rounded scale (and min), so `dequantize_weight`
    is exactly scale.float()·q (+ min.float())."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight expects a (out, in) matrix, found shape {tuple(w.shape)}")
    out, n = w.shape
    g = check_spec(bits, group_size, symmetric, n)
    wg = w.detach().float().reshape(out, n // g, g)  # (out, G, g)
    scale, mn = group_params(wg, bits, symmetric)  # (out, G)
    q = quantize_values(wg, scale[..., None], None if mn is None else mn[..., None], bits, symmetric)
    return _to_storage(q.reshape(out, n), bits, symmetric), scale, mn


def dequantize_weight(codes: Tensor, scale: Tensor, mn: Tensor | None, bits: int, symmetric: bool) -> Tensor:
    """The float32 weight (out, in) of stored codes; the group width follows from the shapes of codes and scale."""
    q = _from_storage(codes, bits, symmetric)  # (out, in)
    out, n = q.shape
    groups = scale.shape[-1]
    qg = q.reshape(out, groups, n // groups)  # (out, G, g)
    w = dequantize_values(qg, scale[..., None], None if mn is None else mn[..., None])
    return w.reshape(out, n)


class QuantLinear(nn.Module):
    """A frozen linear layer with integer weights: codes, float16 scales (and mins) in the format of the module
    docstring; `forward` dequantizes on the fly into the input's dtype and caches nothing."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, bits: int = 8,
                 group_size: int | None = None, symmetric: bool = True, method: str = "rtn",
                 device: Any = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        g = check_spec(bits, group_size, symmetric, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric, self.method = bits, group_size, symmetric, method
        shape = (out_features, in_features if bits == 8 else in_features // 2)
        code_dtype = torch.int8 if bits == 8 and symmetric else torch.uint8
        self.register_buffer("weight", torch.zeros(shape, dtype=code_dtype, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // g, dtype=torch.float16,
                                                         device=device))
        if symmetric:
            self.weight_min: Tensor | None = None
        else:
            self.register_buffer("weight_min", torch.zeros_like(self.weight_scale))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None,
                    symmetric: bool = True) -> "QuantLinear":
        """Round-to-nearest quantization of `linear` (its bias stays float)."""
        codes, scale, mn = quantize_weight(linear.weight, bits, group_size, symmetric)
        return cls.from_codes(codes, scale, mn, linear.bias, bits=bits, group_size=group_size, method="rtn")

    @classmethod
    def from_values(cls, q: Tensor, scale: Tensor, mn: Tensor | None, bias: Tensor | None, *, bits: int,
                    group_size: int | None, method: str) -> "QuantLinear":
        """A layer from integer values q (out, in) (as `quantize_values` returns them) and their scales."""
        return cls.from_codes(_to_storage(q, bits, mn is None), scale, mn, bias, bits=bits, group_size=group_size,
                              method=method)

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, mn: Tensor | None, bias: Tensor | None, *, bits: int,
                   group_size: int | None, method: str) -> "QuantLinear":
        """A layer holding these stored codes, scales and mins (and a copy of the bias)."""
        out = codes.shape[0]
        n = codes.shape[1] * (8 // bits)
        layer = cls(n, out, bias is not None, bits=bits, group_size=group_size, symmetric=mn is None,
                    method=method, device=codes.device, dtype=bias.dtype if bias is not None else torch.float32)
        layer.weight.copy_(codes)
        layer.weight_scale.copy_(scale)
        if mn is not None:
            layer.weight_min.copy_(mn)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @property
    def num_quantized_weights(self) -> int:
        """How many weights the codes stand for (`transforms.count_parameters` counts them)."""
        return self.in_features * self.out_features

    def dequantize(self) -> Tensor:
        """The weight (out, in) in float32."""
        return dequantize_weight(self.weight, self.weight_scale, self.weight_min, self.bits, self.symmetric)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = x.numel() // x.shape[-1]
        if (self.bits == 8 and self.symmetric and self.group_size is None and x.dtype == torch.bfloat16
                and x.device.type == "cpu" and rows <= INT8_MM_MAX_ROWS):
            # int8 weight-only matmul (decode): x (N, in) @ (codes (out, in) · scale (out,))ᵀ
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1).contiguous(), self.weight,
                                                   self.weight_scale[:, 0].to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        """Device moves apply to every tensor; a dtype cast (model.to(torch.bfloat16)) leaves the codes and the
        float16 scales and mins as they are: they are a storage format, not compute tensors."""
        kept = {k: self._buffers[k] for k in ("weight_scale", "weight_min") if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for k, t in kept.items():
            if self._buffers[k].dtype != t.dtype:
                self._buffers[k] = t.to(self._buffers[k].device)
        return self

    def extra_repr(self) -> str:
        group = self.group_size or "channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={group}, symmetric={self.symmetric}, method={self.method}, bias={self.bias is not None}")


ModuleFilter = Callable[[str], bool] | Sequence[str] | None


def block_linears(model: nn.Module, modules: ModuleFilter = None) -> list[tuple[str, nn.Linear]]:
    """The float `nn.Linear`s inside `blocks.*` (attention q/k/v/o, MLP gate/up/down), in module order, that
    `modules` selects: None = all; a predicate on the name; or names / regular expressions matched in full against
    the name (`blocks.0.attn.q`) or its in-block part (`attn.q`, `mlp\\..*`)."""
    found = [(n, m) for n, m in model.named_modules() if n.startswith("blocks.") and type(m) is nn.Linear]
    if modules is None:
        return found
    if callable(modules):
        return [(n, m) for n, m in found if modules(n)]
    if isinstance(modules, str):
        modules = [modules]
    pats = [re.compile(p) for p in modules]
    picked = [(n, m) for n, m in found if any(p.fullmatch(n) or p.fullmatch(n.split(".", 2)[-1]) for p in pats)]
    unused = [p.pattern for p in pats if not any(p.fullmatch(n) or p.fullmatch(n.split(".", 2)[-1])
                                                for n, _ in found)]
    if unused:
        raise ValueError(f"modules {unused} match no float linear layer in the blocks; expected names like "
                         f"{[n for n, _ in found[:3]]} or in-block names like 'attn.q', 'mlp.down'")
    return picked


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name`."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def quantize_rtn(model: nn.Module, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
                 modules: ModuleFilter = None) -> nn.Module:
    """Round-to-nearest weight quantization of the selected block linears, in place; names are kept. Embeddings,
    norms and the LM head stay float."""
    chosen = block_linears(model, modules)
    if not chosen:
        raise ValueError("no float linear layer inside blocks.* to quantize (already quantized, or none selected)")
    for name, lin in chosen:
        check_spec(bits, group_size, symmetric, lin.in_features)  # every layer checked before any is replaced
    for name, lin in chosen:
        set_module(model, name, QuantLinear.from_linear(lin, bits, group_size, symmetric))
    return model


EMBEDDING = "embed.tokens"
"""The token embedding's module name (with tied embeddings, also the output head's weight)."""


@torch.no_grad()
def quantize_embedding(model: nn.Module) -> nn.Module:
    """Round the token embedding (V, C) to int8 with one float16 scale per token row (symmetric, d = max|w| / 127),
    in place: the model keeps a float embedding holding exactly the dequantized values (so a tied output head
    computes with them too), and `save_quantized` stores it as codes and scales (a quarter of float32 on disk).
    Re-quantizing those values gives back the same codes and scales, so a reload re-saves identically."""
    emb = model.get_submodule(EMBEDDING)
    codes, scale, _ = quantize_weight(emb.weight, 8, None, True)  # (V, C) int8, (V, 1) float16
    emb.weight.copy_(dequantize_weight(codes, scale, None, 8, True).to(emb.weight.dtype))
    emb.stored_int8 = True
    return model


class _Stored(nn.Module):
    """A module holding only the named tensors `save_quantized` writes in place of a layer for the time of a save
    (an int8 embedding's codes and scales; an NF4 layer's packed codes and quantization state)."""

    def __init__(self, tensors: dict[str, Tensor]):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v)


NF4_KEYS = {"absmax": "weight_absmax", "quant_map": "weight_quant_map", "nested_absmax": "weight_nested_absmax",
            "nested_quant_map": "weight_nested_quant_map", "quant_state.bitsandbytes__nf4": "weight_quant_state"}
"""bitsandbytes' quantization-state keys of an NF4 weight -> the one-word names a saved folder stores them under."""


def _stored_nf4(layer: NF4Linear) -> _Stored:
    state = {NF4_KEYS[k]: v for k, v in layer.quant_state.as_dict(packed=True).items()}
    bias = {} if layer.bias is None else {"bias": layer.bias.detach()}
    return _Stored({"weight": layer.weight, **state, **bias})


def _dequantized_embedding(sd: dict[str, Tensor], where: str) -> None:
    """Replace the stored int8 embedding codes and scales of `sd` by the float32 weight they stand for."""
    codes, scale = sd.pop(f"{EMBEDDING}.weight", None), sd.pop(f"{EMBEDDING}.weight_scale", None)
    if codes is None or scale is None or codes.dtype != torch.int8 or scale.shape != (codes.shape[0], 1):
        raise InputError(f"{where}: quantization_config.embedding_bits is 8 but the weights hold no int8 "
                         f"{EMBEDDING}.weight (V, C) with a float16 {EMBEDDING}.weight_scale (V, 1)")
    sd[f"{EMBEDDING}.weight"] = dequantize_weight(codes, scale, None, 8, True)


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """`quantization_config` for config.json: {"quant_method": "lmforge", "method", "bits", "group_size" (null: per
    channel), "symmetric", "modules": [names]}; ValueError when the model has no QuantLinear or mixes settings."""
    nf4 = [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if nf4 and not layers:
        kinds = {(m.block_size, m.double_quant) for _, m in nf4}
        if len(kinds) > 1:
            raise ValueError(f"NF4 layers mix (block_size, double_quant) {sorted(kinds)}; one config.json describes one")
        (block, double), = kinds
        qc = {"quant_method": QUANT_METHOD, "method": "nf4", "bits": 4, "block_size": block, "double_quant": double,
              "modules": [n for n, _ in nf4]}
        return _with_embedding(model, qc)
    if nf4:
        raise ValueError("the model mixes NF4 and integer QuantLinear layers; one config.json describes one setting")
    if not layers:
        raise ValueError("the model has no QuantLinear layers; quantize it first (quantize_rtn, gptq_quantize)")
    kinds = {(m.method, m.bits, m.group_size, m.symmetric) for _, m in layers}
    if len(kinds) > 1:
        raise ValueError(f"layers mix quantization settings (method, bits, group_size, symmetric) "
                         f"{sorted(kinds, key=str)}; one config.json describes one setting")
    (method, bits, group_size, symmetric), = kinds
    return _with_embedding(model, {"quant_method": QUANT_METHOD, "method": method, "bits": bits,
                                   "group_size": group_size, "symmetric": symmetric, "modules": [n for n, _ in layers]})


def _with_embedding(model: nn.Module, qc: dict[str, Any]) -> dict[str, Any]:
    if getattr(_find(model, EMBEDDING), "stored_int8", False):
        qc["embedding_bits"] = 8
    return qc


def _find(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def prepare_quantized(model: nn.Module, qc: dict[str, Any], where: str = "config.json",
                      device: str | torch.device | None = None) -> nn.Module:
    """Replace the linears `qc["modules"]` names by empty QuantLinears of its bits / group_size / symmetry (on the
    linears' device, e.g. meta), or by empty NF4Linears when qc's method is nf4 (on `device`, where bitsandbytes
    puts their state as it loads), ready for `load_state_dict`; ValueError naming a bad key or module."""
    nf4 = qc.get("method") == "nf4"
    for key in ("block_size", "double_quant", "modules") if nf4 else ("bits", "group_size", "symmetric", "modules"):
        if key not in qc:
            raise ValueError(f"{where}: quantization_config has no {key!r}; expected "
                             f"{'block_size, double_quant' if nf4 else 'bits, group_size, symmetric'}, modules "
                             f"(found {sorted(qc)})")
    names = qc["modules"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: quantization_config.modules is {names!r}, expected a list of module names")
    group = None if qc.get("group_size") in (None, -1) else qc["group_size"]
    for name in names:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if type(lin) is not nn.Linear or not name.startswith("blocks."):
            raise ValueError(f"{where}: quantization_config.modules names {name!r}, which is not a linear layer in "
                             f"the blocks of this model")
        if nf4:
            set_module(model, name, NF4Linear(lin.in_features, lin.out_features, lin.bias is not None,
                                              bool(qc["double_quant"]), int(qc["block_size"]),
                                              device=device or lin.weight.device))  # its state loads on `device`
            continue
        try:
            q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, bits=qc["bits"],
                            group_size=group, symmetric=qc["symmetric"], method=str(qc.get("method", "rtn")),
                            device=lin.weight.device, dtype=lin.weight.dtype)
        except ValueError as e:
            raise ValueError(f"{where}: quantization_config for {name}: {e}") from None
        set_module(model, name, q)
    return model


def save_quantized(model: nn.Module, tokenizer: Any, path: str | os.PathLike, *,
                   dtype: torch.dtype | None = None, **kwargs: Any) -> Path:
    """`models.loading.save` of a quantized model with its `quantization_config` in config.json; `dtype` casts the
    float parameters only (codes, scales and mins keep their format). `lmforge.load(path)` rebuilds it exactly."""
    qc = quantization_config(model)
    if getattr(getattr(model, "cfg", None), "family", None) == "gpt2":
        raise ValueError("saving a quantized gpt2-family model is not supported: its Hugging Face layout fuses "
                         "q, k, v into one Conv1D (c_attn); quantize a llama/mistral/qwen2 or bert model")
    swaps = {n: _stored_nf4(m) for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    if "embedding_bits" in qc:
        codes, scale, _ = quantize_weight(model.get_submodule(EMBEDDING).weight, 8, None, True)
        swaps[EMBEDDING] = _Stored({"weight": codes, "weight_scale": scale})  # (V, C) int8, (V, 1) float16
    kept = {n: model.get_submodule(n) for n in swaps}
    for n, m in swaps.items():  # stored as codes and states for the time of the save
        set_module(model, n, m)
    try:
        return save(model, tokenizer, path, dtype=dtype, extra_config={"quantization_config": qc}, **kwargs)
    finally:
        for n, m in kept.items():
            set_module(model, n, m)


def is_quantized_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a model folder whose config.json carries an lmforge `quantization_config`."""
    conf = Path(path) / "config.json"
    if not conf.is_file():
        return False
    qc = hf.read_config(conf).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _nf4_states(sd: dict[str, Tensor], qc: dict[str, Any], where: str) -> dict[str, dict[str, Tensor]]:
    """Take each NF4 layer's stored quantization state out of `sd`: {layer name: bitsandbytes' as_dict keys}."""
    states = {}
    for name in qc.get("modules", []):
        state = {k: sd.pop(f"{name}.{stored}") for k, stored in NF4_KEYS.items() if f"{name}.{stored}" in sd}
        needed = {"absmax", "quant_map", "quant_state.bitsandbytes__nf4"}
        if not needed <= state.keys():
            raise InputError(f"{where}: NF4 layer {name} lacks {sorted(NF4_KEYS[k] for k in needed - state.keys())}")
        states[name] = state
    return states


def load_quantized(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a folder written by `save_quantized`: the skeleton with empty QuantLinears where
    quantization_config says, filled with the saved codes, scales and mins exactly; `dtype` casts the float
    parameters only. InputError naming missing or unexpected weights, or a code / scale of the wrong dtype or shape."""
    path = Path(path)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    where = str(path / "config.json")
    conf = hf.read_config(path / "config.json")
    cfg = hf.config_from_hf(conf, where)
    index = path / "model.safetensors.index.json"
    files = sorted(set(hf.read_config(index).get("weight_map", {}).values())) if index.exists() \
        else ["model.safetensors"]
    raw: dict[str, Tensor] = {}
    for f in files:
        raw.update(read_safetensors(path / f))
    sd, unmatched = hf.state_dict_from_hf(raw, cfg)
    if unmatched:
        raise InputError(f"{path}: weights {unmatched[:5]} are not part of a {cfg.family} model")
    qc = conf["quantization_config"]
    if qc.get("embedding_bits") is not None:
        if qc["embedding_bits"] != 8:
            raise InputError(f"{where}: quantization_config.embedding_bits is {qc['embedding_bits']!r}, expected 8")
        _dequantized_embedding(sd, where)
        saved = getattr(torch, str(conf.get("dtype", "float32")), torch.float32)  # the other parameters' dtype
        if isinstance(saved, torch.dtype) and saved.is_floating_point:
            sd[f"{EMBEDDING}.weight"] = sd[f"{EMBEDDING}.weight"].to(saved)
    states = _nf4_states(sd, qc, where) if qc.get("method") == "nf4" else {}
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        prepare_quantized(model, qc, where, device)
    except ValueError as e:
        raise InputError(str(e)) from None
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise InputError(f"{path}: the weights do not match the quantized model that config.json describes: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    buffers = {k for k, _ in model.named_buffers()}
    for k, v in sd.items():
        e = expected[k]
        if v.shape != e.shape or (k in buffers and v.dtype != e.dtype):
            raise InputError(f"{path}: weight {k} is {str(v.dtype).removeprefix('torch.')} {tuple(v.shape)}, "
                             f"expected {str(e.dtype).removeprefix('torch.')} {tuple(e.shape)}")
    cast = {k: v.to(device=device, dtype=v.dtype if k in buffers or dtype is None else dtype) for k, v in sd.items()}
    for name, state in states.items():  # NF4Linear loads its packed weight together with its state
        cast.update({f"{name}.weight.{k}": v.to(device) for k, v in state.items()})
    model.load_state_dict(cast, strict=True, assign=True)
    model.reset_rope()
    if qc.get("embedding_bits") is not None:
        model.get_submodule(EMBEDDING).stored_int8 = True  # a re-save stores the same codes again
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    return model.eval(), tok
