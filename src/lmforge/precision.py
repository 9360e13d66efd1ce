"""The precision context of a forward pass: autocast to bf16 / fp16, or nothing for fp32. The trainer and the RL
rollouts both use it, so log-probs computed while sampling match those of the training forward; the evaluation
harness uses `widened` for models held in bf16. Floor 0.

On a CPU without native bf16 (no AVX512-BF16 / AMX among `torch.cpu.get_capabilities()`), a bf16 matmul is
widened to fp32 inside oneDNN's kernel and runs at about a quarter of the fp32 GEMM's speed. There the bf16
context also routes every `F.linear` through `WidenedLinear`: the same bf16-rounded operands, widened once and
multiplied by the fp32 GEMM (a bf16 product is exact in fp32, sums are fp32 either way), the output and the
gradients rounded to bf16 as autocast's would be, and the same bf16 tensors saved for the backward pass."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["autocast", "resolve", "widened", "NATIVE_BF16", "WidenedLinear", "checkpoint_contexts"]

_CAPS = getattr(torch.cpu, "get_capabilities", dict)()  # {"avx512_bf16": bool, "amx_bf16": bool, ...}
NATIVE_BF16 = bool(_CAPS.get("avx512_bf16") or _CAPS.get("amx_bf16"))
"""Whether this CPU multiplies bf16 natively (else a bf16 GEMM runs at ~1/4 of fp32: 68 vs 275 GFLOP/s on a
2-core AVX-512 Xeon)."""


class WidenedLinear(torch.autograd.Function):
    """y = x Wᵀ + b for bf16 x, W (and b) through fp32 GEMMs; y, dx and dW in bf16."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.bias = b is not None
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.float().reshape(-1, g.shape[-1])  # (N, out)
        with torch.autocast("cpu", enabled=False):
            gx = (g2 @ w.float()).to(x.dtype).view(x.shape) if ctx.needs_input_grad[0] else None
            gw = (g2.T @ x.float().reshape(-1, x.shape[-1])).to(w.dtype) if ctx.needs_input_grad[1] else None
            gb = g2.sum(0).to(torch.bfloat16) if ctx.bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


class _Widen(TorchFunctionMode):
    """CPU linears through WidenedLinear: under autocast, of any floating operands rounded to bf16 (training);
    without it, of operands that are bf16 already (the forward of a bf16 model)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].device.type == "cpu":
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            bf = torch.bfloat16
            if x.dtype == w.dtype == bf or (x.is_floating_point() and w.is_floating_point() and
                                            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == bf):
                return WidenedLinear.apply(x.to(bf), w.to(bf), None if b is None else b.to(bf))
        return func(*args, **kwargs)


def widened(model: object) -> contextlib.AbstractContextManager:
    """A context for the forward of `model` (evaluation): when it is a module holding bf16 parameters on a CPU
    without native bf16, its bf16 linears multiply the same operands with fp32 GEMMs (about 2x faster for
    SmolLM2-135M's log-likelihoods), outputs rounded to bf16 as a bf16 GEMM's are; otherwise (another model, such
    as an ONNX graph) nothing changes."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    bf16_on_cpu = any(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)
    return _Widen() if bf16_on_cpu and not NATIVE_BF16 else contextlib.nullcontext()


_active: list[bool] = []  # one entry per widened bf16 context entered and not yet left


@contextlib.contextmanager
def _widened_bf16():
    with torch.autocast("cpu", dtype=torch.bfloat16), _Widen():
        _active.append(True)
        try:
            yield
        finally:
            _active.pop()


def checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` of activation checkpointing: a block recomputed in the backward pass (outside the forward's
    context) routes its linears as the forward did, so it saves the same tensors."""
    return contextlib.nullcontext(), (_Widen() if _active else contextlib.nullcontext())


def resolve(precision: str, device: str = "auto") -> str:
    """The precision "auto" stands for on `device` ("cpu", "cuda[:N]", or "auto": CUDA when available): bf16 where
    its matmuls are fast (a CUDA device that supports it, a CPU with AVX512-BF16 / AMX), fp16 on an older CUDA
    device, fp32 on any other CPU (a bf16 GEMM there runs at a quarter of fp32's speed). Other values unchanged."""
    if precision != "auto":
        return precision
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    if kind == "cuda":  # bf16 tensor cores from compute capability 8 (Ampere) on
        index = None if device in ("auto", "cuda") else torch.device(device)
        return "bf16" if torch.cuda.get_device_capability(index)[0] >= 8 else "fp16"
    return "bf16" if kind == "cpu" and NATIVE_BF16 else "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A fresh context for `precision` ("fp32", "bf16" or "fp16") on `device`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    if precision == "bf16" and kind == "cpu" and not NATIVE_BF16:
        return _widened_bf16()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(kind, dtype=dtype)
