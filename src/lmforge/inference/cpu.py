"""CPU fast path for generation: linear weights re-laid out once in oneDNN's blocked format.

Decoding one token is a matrix-vector product per layer, bound by how fast weights stream from memory; the
plain strided GEMV reaches about half the bandwidth that oneDNN reaches on a prepacked weight (measured in
benchmarks/inference.py). The packed copies are kept beside the model's own weights and repacked when a weight
changes in place (its version counter moves), so a model that is being trained (RL rollouts) stays exact.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..precision import NATIVE_BF16


WIDEN_ROWS = 16
"""From this many input rows (a prompt chunk), a bfloat16 layer on a CPU without native bfloat16 widens its
weight to float32 once per call and multiplies in float32: the same products (a bfloat16 product is exact in
float32) and float32 sums, four times faster; decode steps (fewer rows) stream the bfloat16 weight."""


class _Scratch:
    """One float32 buffer that the block layers of a model widen their bfloat16 weights into, in turn (a forward
    pass runs them one after another): no allocation, page faults or concatenation per call; as large as the
    largest of them."""

    def __init__(self):
        self.buf = torch.empty(0)

    def widen(self, weights: list[Tensor]) -> Tensor:
        """The weights stacked by rows, as float32 (out, in), in the buffer."""
        n, k = sum(w.shape[0] for w in weights), weights[0].shape[1]
        if self.buf.numel() < n * k:
            self.buf = torch.empty(n * k)
        out, row = self.buf[:n * k].view(n, k), 0
        for w in weights:
            out[row:row + w.shape[0]].copy_(w.detach())
            row += w.shape[0]
        return out


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class _Packed:
    """Weights (out_i, in) used as one linear layer of their stacked rows, and its packed copy, refreshed when any
    of the weights' versions moves (an in-place update such as an optimizer step)."""

    def __init__(self, weights: list[Tensor], biases: list[Tensor | None] | None = None,
                 scratch: _Scratch | None = None):
        self.weights, self.biases, self.scratch = weights, biases or [None] * len(weights), scratch
        self.sizes = [w.shape[0] for w in weights]
        self.versions, self.packed, self.bias = None, None, None

    def _refresh(self) -> None:
        versions = tuple(t._version for t in self.weights + [b for b in self.biases if b is not None])
        if versions != self.versions:
            w = torch.cat([w.detach() for w in self.weights]) if len(self.weights) > 1 else self.weights[0].detach()
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
            if any(b is not None for b in self.biases):
                self.bias = self._stacked_bias()
            self.versions = versions

    def __call__(self, x: Tensor) -> Tensor:
        w = self.weights[0]
        if torch.is_grad_enabled() or x.dtype != w.dtype:
            return torch.cat([F.linear(x, w, b) for w, b in zip(self.weights, self.biases)], -1)
        rows = x.reshape(-1, x.shape[-1])  # (M, in)
        if w.dtype == torch.bfloat16 and not NATIVE_BF16 and rows.shape[0] >= WIDEN_ROWS:
            wide = (self.scratch or _Scratch()).widen(self.weights)  # (out, in) float32
            bias = self._stacked_bias().to(w.dtype).float() if any(b is not None for b in self.biases) else None
            y = F.linear(rows.float(), wide, bias).to(w.dtype)  # precision.WidenedLinear's forward
        else:
            self._refresh()
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], sum(self.sizes))  # (..., out)

    def _stacked_bias(self) -> Tensor:
        return torch.cat([b.detach() if b is not None else w.new_zeros(n)
                          for w, b, n in zip(self.weights, self.biases, self.sizes)])


def _plain(*layers: nn.Module) -> bool:
    return all(type(m) is nn.Linear and m.weight.is_floating_point() for m in layers)


class PackedWeights:
    """Packed copies of a model's linear weights: q/k/v stacked into one matrix, gate/up into one, every other
    nn.Linear and the LM head on its own. `with packed.installed():` routes the layers through them for the
    duration of a forward pass only, so the model object itself is never altered (it can be trained, copied or
    saved between engine steps). Costs one extra copy of the weights in memory."""

    def __init__(self, model: nn.Module):
        from ..models.transformer import MLP, Attention

        self.model = model
        self.overrides: list[tuple[nn.Module, str, object]] = []  # (module, attribute, replacement)
        self.scratch = scratch = _Scratch()  # shared by the block layers; the LM head (the largest) widens into its own
        fused: set[nn.Module] = set()
        for m in model.modules():
            if isinstance(m, Attention) and _plain(m.q, m.k, m.v):
                p = _Packed([m.q.weight, m.k.weight, m.v.weight], [m.q.bias, m.k.bias, m.v.bias], scratch)
                self.overrides.append((m, "project_qkv", lambda x, p=p: p(x).split(p.sizes, -1)))
                fused |= {m.q, m.k, m.v}
            elif isinstance(m, MLP) and m.gated and _plain(m.gate, m.up):
                p = _Packed([m.gate.weight, m.up.weight], [m.gate.bias, m.up.bias], scratch)

                def mlp(x, m=m, p=p):
                    g, u = p(x).split(p.sizes, -1)  # (..., F) each
                    return m.down(m.act(g) * u)

                self.overrides.append((m, "forward", mlp))
                fused |= {m.gate, m.up}
        for m in model.modules():
            if _plain(m) and m not in fused:
                p = _Packed([m.weight], [m.bias], scratch if m is not getattr(model, "lm_head", None) else None)
                self.overrides.append((m, "forward", lambda x, p=p: p(x)))
        cfg = getattr(model, "cfg", None)
        if cfg is not None and cfg.head == "lm":
            head = _Packed([model.embed.tokens.weight if cfg.tie_embeddings else model.lm_head.weight])
            self.overrides.append((model, "project", lambda h: head(h)))

    @contextmanager
    def installed(self):
        for m, name, fn in self.overrides:  # instance attributes shadow the class's methods
            m.__dict__[name] = fn
        try:
            yield
        finally:
            for m, name, _ in self.overrides:
                m.__dict__.pop(name, None)
