"""Weight-only quantization of linear layers. NF4 (QLoRA, Dettmers et al., 2023, §3) through bitsandbytes.

A quantized layer keeps the state-dict key `<name>.weight` (packed uint8 codes) and writes its quantization
state next to it (`<name>.weight.absmax`, ...), as bitsandbytes' own Linear4bit does; loading a float
`<name>.weight` from a base checkpoint into it quantizes that weight, so base checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NF4Linear", "quantize_nf4", "dequantize_nf4", "to_linear"]


def _bnb() -> Any:
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        raise ImportError("QLoRA needs bitsandbytes: pip install 'lmforge[qlora]'") from None
    return bitsandbytes


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight (out, in) is stored as 4-bit NormalFloat codes plus per-block
    absmax scales (themselves 8-bit quantized with `double_quant`). It has no trainable parameters."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, double_quant: bool = True,
                 block_size: int = 64, compute_dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.double_quant, self.block_size, self.compute_dtype = double_quant, block_size, compute_dtype
        self.register_buffer("weight", torch.empty((out_features * in_features + 1) // 2, 1, dtype=torch.uint8,
                                                   device=device))  # packed codes, two per byte
        self.quant_state: Any = None
        """bitsandbytes QuantState: absmax scales, code book, dtype and shape of the original weight."""
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True, block_size: int = 64,
                    compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize `linear`'s weight; the dequantized weight has `compute_dtype` (default: the weight's dtype)."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, double_quant, block_size,
                compute_dtype or w.dtype, device=w.device)
        q.quantize_(w)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    @torch.no_grad()
    def quantize_(self, w: Tensor) -> None:
        """Replace the stored weight by the NF4 quantization of the float matrix w (out, in)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"NF4Linear: weight has shape {tuple(w.shape)}, expected "
                             f"{(self.out_features, self.in_features)}")
        bnb = _bnb()
        w = w.detach().to(self.compute_dtype or w.dtype).contiguous()
        packed, self.quant_state = bnb.functional.quantize_4bit(
            w, blocksize=self.block_size, compress_statistics=self.double_quant, quant_type="nf4")
        self.weight = packed

    def dequantize(self) -> Tensor:
        """The weight (out, in) in its compute dtype."""
        return _bnb().functional.dequantize_4bit(self.weight, self.quant_state)

    @property
    def num_quantized_weights(self) -> int:
        """Number of weights the packed storage represents (for parameter counts)."""
        return self.out_features * self.in_features

    def nbytes(self) -> int:
        """Bytes of the quantized storage: packed codes, scales and (with double quant) the scales' scales."""
        qs = self.quant_state
        parts = [self.weight, qs.absmax, qs.code]
        if qs.nested:
            parts += [qs.state2.absmax, qs.state2.code]
        return sum(t.numel() * t.element_size() for t in parts)

    def forward(self, x: Tensor) -> Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        y = _bnb().matmul_4bit(x, self.weight.t(), quant_state=self.quant_state)  # (..., out) in x's dtype
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)  # dtype conversions leave the uint8 codes alone
        if self.quant_state is not None:
            self.quant_state.to(self.weight.device)  # moves in place
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.quant_state is None:  # an empty skeleton, to be filled by a load
            return
        for k, v in self.quant_state.as_dict(packed=True).items():
            destination[f"{prefix}weight.{k}"] = v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        w = state_dict.get(key)
        if w is not None:
            state_dict = dict(state_dict)
            qs = {k[len(key) + 1:]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key + ".")}
            if w.is_floating_point():  # a base checkpoint: quantize its float weight
                try:
                    self.quantize_(w.to(self.weight.device))
                except ValueError as e:
                    error_msgs.append(f"{key}: {e}")
                    return
                state_dict[key] = self.weight
            elif not qs:
                error_msgs.append(f"{key}: packed NF4 weight without its quantization state ({key}.absmax, ...)")
                return
            else:
                self.quant_state = _bnb().functional.QuantState.from_dict(qs, device=self.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4, block_size={self.block_size}, double_quant={self.double_quant}")


def _block_linear(name: str) -> bool:
    return name.startswith("blocks.")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is (the way every transform swaps a layer)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_nf4(model: nn.Module, names_filter: Callable[[str], bool] | None = None, double_quant: bool = True,
                 block_size: int = 64, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the plain nn.Linear layers selected by `names_filter(name)` (default: those of the transformer
    blocks; embeddings, heads and norms stay in full precision) by frozen NF4Linear layers, in place. Layers
    inside a wrapper (the adapters of a LoRALinear) are left alone."""
    keep = names_filter or _block_linear
    wrapped = tuple(n + "." for n, m in model.named_modules() if hasattr(m, "base_layer"))  # adapters stay float
    chosen = [n for n, m in model.named_modules()
              if type(m) is nn.Linear and keep(n) and not (wrapped and n.startswith(wrapped))]
    for name in chosen:
        linear = model.get_submodule(name)
        replace_module(model, name, NF4Linear.from_linear(linear, double_quant, block_size, compute_dtype))
    return model


def dequantize_nf4(model: nn.Module) -> nn.Module:
    """Replace every NF4Linear by a plain nn.Linear holding its dequantized weight (e.g. before `lmforge.save`)."""
    for name in [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]:
        replace_module(model, name, to_linear(model.get_submodule(name)))
    return model


def to_linear(q: NF4Linear, delta: Tensor | None = None) -> nn.Linear:
    """A plain frozen nn.Linear with q's dequantized weight (+ delta (out, in), e.g. a merged LoRA update)."""
    w = q.dequantize()
    if delta is not None:
        w = (w.float() + delta.float()).to(w.dtype)
    linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
    linear.weight = nn.Parameter(w, requires_grad=False)
    if q.bias is not None:
        linear.bias = q.bias
    return linear
