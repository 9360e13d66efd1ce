"""Training FLOPs: C ≈ 6·N·D plus the attention term (Kaplan et al. 2020, Table 1; PaLM, Chowdhery et al. 2022,
App. B), and Chinchilla's compute-optimal sizing (Hoffmann et al. 2022: D ≈ 20·N at C ≈ 6·N·D).

Conventions, chosen to match `torch.utils.flop_counter.FlopCounterMode` on a forward + backward of our model:
a multiply-add is 2 FLOPs; backward costs twice the forward (gradients of inputs and of weights); N is the weights
of the matrix multiplies a token passes through (`counts.matmul_parameters`: block linears and the output
projection; not embedding lookups, norms or biases); the attention term counts the full T×T score matrix — no
discount for the causal mask (a causal kernel that skips the masked half does about half of it). The trainer's MFU
uses the same 12·L·d·T term.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..models.transformer import ModelConfig
from .counts import matmul_parameters

__all__ = [
    "CHINCHILLA_SIZES",
    "CHINCHILLA_TOKENS_PER_PARAM",
    "ChinchillaPoint",
    "FlopsPerToken",
    "chinchilla_for_flops",
    "chinchilla_for_params",
    "chinchilla_table",
    "flops_per_token",
    "run_flops",
    "train_seconds",
]

CHINCHILLA_TOKENS_PER_PARAM = 20.0
"""Compute-optimal tokens per parameter (Hoffmann et al. 2022: D ≈ 20·N)."""
CHINCHILLA_SIZES = (400e6, 1e9, 10e9, 67e9, 175e9, 280e9, 520e9, 1e12, 10e12)
"""Model sizes of Hoffmann et al. 2022, Table 3."""


@dataclass
class FlopsPerToken:
    """Training FLOPs (forward + backward) per token."""

    matmul_params: int
    """N: weights of the per-token matrix multiplies (block linears + output projection)."""
    dense: float
    """6·N: 2 FLOPs per multiply-add forward, twice that backward."""
    attention: float
    """12·L·(H·D)·T: QKᵀ and AV (4·T·H·D per token and layer forward), times 3 for forward + backward, no causal
    discount."""
    per_sequence: float
    """6·(pooler + NSP + classifier weights) / T: heads applied to one token per sequence."""
    total: float
    """dense + attention + per_sequence."""
    seq_len: int
    """T, the sequence length the attention term is for."""

    def to_dict(self) -> dict:
        return asdict(self)


def flops_per_token(cfg: ModelConfig, seq_len: int, causal_discount: bool = False) -> FlopsPerToken:
    """Forward + backward FLOPs per token of a training sequence of `seq_len` tokens; `causal_discount` halves the
    attention term (what a kernel that skips masked blocks does), off by default to match FlopCounterMode."""
    if seq_len < 1:
        raise ValueError(f"seq_len: expected a positive number of tokens, found {seq_len}")
    per_token, per_seq = matmul_parameters(cfg)
    window = min(seq_len, cfg.sliding_window) if cfg.sliding_window and causal_discount else seq_len
    attn = 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * window  # scores and values, fwd + bwd
    if causal_discount and cfg.causal:
        attn /= 2
    seq = 6.0 * per_seq / seq_len
    return FlopsPerToken(per_token, 6.0 * per_token, attn, seq, 6.0 * per_token + attn + seq, seq_len)


def run_flops(cfg: ModelConfig, tokens: float, seq_len: int) -> float:
    """Training FLOPs of `tokens` tokens in sequences of `seq_len`: C = tokens × flops_per_token."""
    return tokens * flops_per_token(cfg, seq_len).total


@dataclass
class ChinchillaPoint:
    """A compute-optimal (N, D, C) under C = 6·N·D and D = r·N."""

    params: float
    """N, parameters."""
    tokens: float
    """D, training tokens."""
    flops: float
    """C = 6·N·D."""

    def to_dict(self) -> dict:
        return asdict(self)


def chinchilla_for_params(params: float, tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM) -> ChinchillaPoint:
    """The compute-optimal budget of an N-parameter model: D = r·N tokens, C = 6·N·D."""
    tokens = tokens_per_param * params
    return ChinchillaPoint(params, tokens, 6.0 * params * tokens)


def chinchilla_for_flops(flops: float, tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM) -> ChinchillaPoint:
    """The compute-optimal (N, D) for a budget C: C = 6·N·(r·N) gives N = √(C / 6r), D = r·N."""
    if not flops > 0:
        raise ValueError(f"flops: expected a positive budget, found {flops}")
    return chinchilla_for_params(math.sqrt(flops / (6.0 * tokens_per_param)), tokens_per_param)


def chinchilla_table(sizes: tuple[float, ...] = CHINCHILLA_SIZES,
                     tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM) -> list[ChinchillaPoint]:
    """The compute-optimal (N, D, C) of each model size (Hoffmann et al. 2022, Table 3's sizes by default)."""
    return [chinchilla_for_params(n, tokens_per_param) for n in sizes]


def train_seconds(tokens: float, tokens_per_s: float) -> float:
    """Wall time of `tokens` at a measured throughput."""
    if not tokens_per_s > 0:
        raise ValueError(f"tokens_per_s: expected a positive throughput, found {tokens_per_s}")
    return tokens / tokens_per_s
