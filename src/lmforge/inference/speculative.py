"""The two rules of speculative decoding that need no engine state: where prompt lookup finds its draft (Saxena,
2023), and which drafted tokens the target model accepts (Leviathan et al., 2023; Chen et al., 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lookup", "accept"]


def lookup(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup: the k tokens that followed the latest earlier occurrence of the longest suffix n-gram."""
    if k <= 0:
        return []
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tail:
                return tokens[start + n:start + n + k]
    return []


def accept(p: Tensor, drafts: list[int], q: Tensor | None, greedy: bool, generator: torch.Generator | None
           ) -> tuple[list[int], int]:
    """(accepted drafts, the token after them) given the target's probabilities p (k + 1, V) at the k drafted
    positions and one beyond, and the draft's q (k, V) (None for prompt lookup, which proposes with certainty).

    Greedy keeps drafts equal to the argmax; sampling accepts d with probability min(1, p(d)/q(d)) and on rejection
    draws from max(0, p - q) normalised, which leaves the target distribution unchanged."""
    accepted: list[int] = []
    for i, d in enumerate(drafts):
        if greedy:
            ok = int(p[i].argmax()) == d
        else:
            qd = 1.0 if q is None else float(q[i, d])
            ok = float(torch.rand((), generator=generator, device=p.device)) * qd < float(p[i, d])
        if not ok:
            break
        accepted.append(d)
    i = len(accepted)
    if greedy:
        return accepted, int(p[i].argmax())
    if i < len(drafts):
        residual = p[i].clone()
        if q is None:
            residual[drafts[i]] = 0
        else:
            residual = (residual - q[i]).clamp(min=0)
        return accepted, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return accepted, int(torch.multinomial(p[i], 1, generator=generator))
