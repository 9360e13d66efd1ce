"""The LM loss without the logits: chunked cross-entropy of h Wᵀ with its gradients computed in the same pass, and its
vocabulary-parallel form for an output embedding split by rows over a tensor-parallel mesh."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["distributed", "linear_cross_entropy", "vocab_shard"]


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ cross-entropy(h Wᵀ, labels) over chunks of tokens, with gradients computed in the same pass, so the
    full (N, V) logits and their fp32 copy are never stored (labels of -100 are skipped).

    Vocabulary-parallel (Megatron-LM's parallel cross-entropy, Shoeybi et al. 2019): with a process `group`, w is
    this process's rows [start, start + V/P) of the output embedding; the log-sum-exp is completed with an all-reduce
    of the row maxima and of the exp sums, the label's logit with one of the picked values, and h's gradient with
    one at the end, so no process ever holds logits of the whole vocabulary."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, labels: Tensor, chunk: int, dtype: torch.dtype, group: Any = None,
                start: int = 0) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen (e.g. LoRA) head needs no grad_w
        rows = (labels != -100).nonzero().squeeze(1)  # only labelled tokens cost anything (SFT masks prompts)
        hc, wc, y = h[rows].to(dtype), w.to(dtype), labels[rows] - start  # (M, C), (V, C), (M,) local ids
        grad_h = torch.zeros(h.shape, dtype=dtype, device=h.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for a in range(0, hc.shape[0], chunk):
            b = min(a + chunk, hc.shape[0])
            logp = _log_softmax(hc[a:b] @ wc.t(), group)  # (n, V) log-probabilities (of this process's rows)
            mine = (y[a:b] >= 0) & (y[a:b] < wc.shape[0])  # (n,) labels among this process's rows
            idx = torch.arange(b - a, device=h.device)[mine], y[a:b][mine]
            total -= _all_sum(logp[idx].sum(), group)
            if need_h or need_w:
                g = logp.exp_()  # softmax, in place
                g[idx] -= 1.0
                g = g.to(dtype)  # (n, V): d loss / d logits
                if need_h:
                    grad_h[rows[a:b]] = g @ wc
                if need_w:
                    grad_w += (g.t() @ hc[a:b]).float()
        if need_h and group is not None:
            _all_sum(grad_h, group)  # each process holds its rows' share of d loss / d h
        ctx.grads = (grad_h, grad_w)  # not save_for_backward: they are outputs of this pass, not its inputs
        ctx.input_dtypes = (h.dtype, w.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return (None if grad_h is None else grad_h.to(ctx.input_dtypes[0]) * grad_out,
                None if grad_w is None else grad_w.to(ctx.input_dtypes[1]) * grad_out, None, None, None, None, None)


def distributed() -> bool:
    """A process group exists (only then can a weight be a DTensor split over processes)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_sum(t: Tensor, group: Any) -> Tensor:
    if group is not None:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM, group=group)
    return t


def _log_softmax(z: Tensor, group: Any) -> Tensor:
    """log softmax over the last dimension in fp32; with a group, over the vocabulary split between its processes."""
    if group is None:
        return torch.log_softmax(z, -1, dtype=torch.float32)
    z = z.float()
    m = z.max(-1).values  # (n,)
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    z -= m[:, None]
    lse = _all_sum(z.exp().sum(-1), group).log_()  # (n,)
    return z.sub_(lse[:, None])


def vocab_shard(w: Tensor) -> tuple[Tensor, Any, int]:
    """(local rows, process group, first row) of an output embedding split by rows over a tensor-parallel mesh (a
    DTensor sharded on dim 0), or (w, None, 0) for a whole one. The local rows stay differentiable."""
    if not distributed():
        return w, None, 0
    from torch.distributed.tensor import DTensor

    if not isinstance(w, DTensor):
        return w, None, 0
    local = w.to_local()
    return local, w.device_mesh.get_group(), w.device_mesh.get_local_rank() * local.shape[0]


def linear_cross_entropy(h: Tensor, w: Tensor, labels: Tensor, chunk: int | None = None) -> Tensor:
    """Summed next-token cross-entropy of logits h Wᵀ (h (N, C), w (V, C), labels (N,)), chunked (default: 256
    tokens on CPU, where a chunk's logits then stay in cache, 4096 on accelerators); vocabulary-parallel when w is
    split by rows over a tensor-parallel mesh."""
    dev = h.device.type
    chunk = chunk or (256 if dev == "cpu" else 4096)
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    w, group, start = vocab_shard(w)
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h, w, labels, chunk, dtype, group, start)
