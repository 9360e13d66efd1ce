"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Alg. 1): quantize a linear layer's columns one at a time in a fixed order and push each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian H⁻¹ of the layer-wise loss
‖XWᵀ − XŴᵀ‖² (H = 2XᵀX/n over calibration inputs X), using the upper Cholesky factor of H⁻¹ and lazy updates in
blocks of columns. The result is a `QuantLinear` on the same grid as round-to-nearest (`quant.group_params`,
`quant.quantize_values`), so a GPTQ layer is stored, loaded and exported exactly as an RTN one.

Groups: without act-order a group's scale (and min) is computed when its first column comes up, from the weights as
updated so far (the reference code reads them before the pending in-block updates are applied; we apply them).
With act-order (columns in order of decreasing H_jj) groups stay the contiguous column ranges of the original order
("static groups", AutoGPTQ's `static_groups`): their scales are computed once from the weights before any update,
and the permutation is undone on the codes, so no g_idx is stored and a group of 32 is a GGUF block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .calibrate import calibrate_sequential
from .quant import ModuleFilter, QuantLinear, block_linears, check_spec, dequantize_values, group_params, \
    quantize_values

__all__ = ["GPTQConfig", "gptq_quantize", "gptq_weight", "GPTQObserver", "HessianAccumulator",
           "inverse_hessian_factor"]


@dataclass
class GPTQConfig:
    """Settings of GPTQ quantization."""

    bits: int = 4
    """Bits per weight: 4 or 8."""
    group_size: int | None = 128
    """Input columns sharing one scale; None for one scale per output channel."""
    symmetric: bool = True
    """Symmetric grid (scale only, Q4_0 / Q8_0) or asymmetric (scale and min, Q4_1)."""
    act_order: bool = False
    """Quantize columns in order of decreasing Hessian diagonal (groups stay contiguous: static groups)."""
    damp: float = 0.01
    """Dampening added to the Hessian diagonal, as a fraction of its mean (percdamp)."""
    block_size: int = 128
    """Columns per lazy batch update."""
    true_sequential: bool = True
    """Calibrate q/k/v, then o, then gate/up, then down, each on inputs from the already quantized layers."""
    batch_size: int = 8
    """Calibration sequences per forward."""

    def validate(self) -> None:
        check_spec(self.bits, self.group_size, self.symmetric, self.group_size or 2)
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp is {self.damp}, expected a fraction of the mean Hessian diagonal in [0, 1)")
        for name in ("block_size", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} is {v!r}, expected a positive integer")


@torch.no_grad()
def inverse_hessian_factor(h: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(U (in, in), dead (in,) bool): the upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean diag H, after setting
    H_jj = 1 on the inputs that were always zero (`dead`: any weight will do there). GPTQ and SparseGPT read the
    rows of U; ValueError when H is not positive definite."""
    H = h.detach().float().clone()  # (in, in)
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H.diagonal().add_(damp * H.diagonal().mean())
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True), dead
    except torch.linalg.LinAlgError:
        raise ValueError(f"the Hessian is not positive definite with damp={damp}; raise damp (e.g. 0.1) or give "
                         f"more calibration data") from None


def gptq_weight(w: Tensor, h: Tensor, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
                act_order: bool = False, damp: float = 0.01,
                block_size: int = 128) -> tuple[Tensor, Tensor, Tensor | None]:
    """GPTQ of one weight w (out, in) given the Hessian h (in, in): (q (out, in) integer values as float32, scale
    (out, G) float16, min (out, G) float16 or None), dequantized by `quant.dequantize_values`. Alg. 1 in float32."""
    W = w.detach().float().clone()  # (out, in)
    H = h.detach().float().clone()  # (in, in)
    out, n = W.shape
    if H.shape != (n, n):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected ({n}, {n}) for a weight with {n} inputs")
    g = check_spec(bits, group_size, symmetric, n)
    dead = H.diagonal() == 0  # inputs that were always zero: any weight will do
    H[dead, dead] = 1
    W[:, dead] = 0
    scale = torch.zeros(out, n // g, dtype=torch.float16, device=W.device)
    mn = None if symmetric else torch.zeros_like(scale)
    perm = None
    if act_order:
        s, m = group_params(W.reshape(out, n // g, g), bits, symmetric)  # static groups, before any update
        scale.copy_(s)
        if mn is not None:
            mn.copy_(m)
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    hinv, _ = inverse_hessian_factor(H, damp)  # (in, in)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()  # (out, b): this block, updated at once
        Err1 = torch.zeros_like(W1)  # (out, b): scaled errors, applied to later blocks lazily
        H1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if perm is None and col % g == 0:  # a group starts: its grid from the weights as updated so far
                cur = W1[:, i:min(col + g, i2) - i1]
                if col + g > i2:  # the group reaches into later blocks: add the updates still pending there
                    cur = torch.cat((cur, W[:, i2:col + g] - Err1 @ hinv[i1:i2, i2:col + g]), 1)
                s, m = group_params(cur, bits, symmetric)
                scale[:, col // g] = s
                if mn is not None:
                    mn[:, col // g] = m
            gi = (int(perm[col]) if perm is not None else col) // g
            s, m = scale[:, gi], None if mn is None else mn[:, gi]
            q = quantize_values(W1[:, i], s, m, bits, symmetric)  # (out,)
            Q[:, col] = q
            err = (W1[:, i] - dequantize_values(q, s, m)) / H1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * H1[i, i:][None, :]  # OBS update of the block's remaining columns
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]  # lazy batch update of the later columns
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]  # back to the original column order
    return Q, scale, mn


class HessianAccumulator:
    """H = 2XᵀX/n of one linear's calibration inputs X (N, in), summed batch by batch; layers fed the same input
    (q, k, v; gate, up) share each batch's XᵀX through `shared`."""

    def __init__(self, linear: nn.Linear, shared: dict):
        self.shared = shared
        self.h = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)  # (in, in)
        self.rows = 0

    def add(self, x: Tensor) -> None:
        if self.shared.get("x") is not x:
            self.shared.update(x=x, xtx=x.t() @ x)  # (in, in)
        self.h += self.shared["xtx"]
        self.rows += x.shape[0]

    def hessian(self) -> Tensor:
        """The accumulated H (in, in); the accumulator lets go of it and of the shared batch."""
        self.shared.clear()
        h, self.h = self.h.mul_(2 / max(self.rows, 1)), None
        return h


class GPTQObserver(HessianAccumulator):
    """Accumulates H = 2XᵀX/n for one linear and, when all calibration rows are in, replaces the layer by its GPTQ
    `QuantLinear`.

    Every row counts, the attention-sink rows with massive activations (Sun et al. 2024) included, although they
    dominate H in SmolLM2's last blocks (row norm 2400 against a median of 48 at the down projection): leaving
    them out made the other rows' layer error 5× smaller there but held-out bits per byte 11% worse (0.947 against
    0.850, int4 g32 act-order), as errors on the sink's keys and values reach every token."""

    def __init__(self, linear: nn.Linear, cfg: GPTQConfig, shared: dict):
        super().__init__(linear, shared)
        self.linear, self.cfg = linear, cfg

    def finish(self) -> QuantLinear:
        c = self.cfg
        q, scale, mn = gptq_weight(self.linear.weight, self.hessian(), c.bits, c.group_size, c.symmetric,
                                   c.act_order, c.damp, c.block_size)
        return QuantLinear.from_values(q, scale, mn, self.linear.bias, bits=c.bits, group_size=c.group_size,
                                       method="gptq")


def gptq_quantize(model: nn.Module, calibration: Tensor | Sequence[Tensor], bits: int = 4,
                  group_size: int | None = 128, symmetric: bool = True, act_order: bool = False, damp: float = 0.01,
                  block_size: int = 128, progress: bool = True, *, modules: ModuleFilter = None,
                  true_sequential: bool = True, batch_size: int = 8) -> nn.Module:
    """GPTQ of the selected block linears (default all), in place, calibrated layer-sequentially on `calibration`
    token ids ((n, T) or a list of (1, T)); embeddings, norms and the LM head stay float. Returns the model."""
    cfg = GPTQConfig(bits, group_size, symmetric, act_order, damp, block_size, true_sequential, batch_size)
    cfg.validate()
    for _, lin in block_linears(model, modules):
        check_spec(bits, group_size, symmetric, lin.in_features)  # before any calibration work
    shared: dict = {}
    return calibrate_sequential(model, calibration, lambda _name, lin: GPTQObserver(lin, cfg, shared),
                                modules=modules, true_sequential=true_sequential, batch_size=batch_size,
                                progress=progress, description="gptq")
