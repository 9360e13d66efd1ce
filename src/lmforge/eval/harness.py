"""Model-side primitives that every evaluation task is built from: the log-likelihood of continuations given a
context (multiple choice, cloze), the rolling log-likelihood of a long document (perplexity), bits per byte.

Numbers follow lm-evaluation-harness (`HFLM._loglikelihood_tokens`, `loglikelihood_rolling`) so results compare:
fp32 log-softmax, the first continuation token scored from the context's last position, `is_greedy` when every
continuation token is the argmax. No task logic lives here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.transformer import DenseKVCache, Transformer
from ..precision import widened

__all__ = ["loglikelihood", "rolling_loglikelihood", "rolling_windows", "bits_per_byte"]


@dataclass
class _Group:
    """The requests of one context (e.g. the choices of one question), scored together."""

    context: list[int]
    """Context token ids (already left-truncated to fit the model)."""
    members: list[tuple[int, list[int]]]
    """(request index, continuation ids) of every request with this context."""


def _groups(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int) -> list[_Group]:
    """Group requests by identical context, longest first (less padding per batch, largest memory first)."""
    by_ctx: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if len(ctx) == 0:
            raise ValueError(f"request {i}: empty context; condition on a prefix token (BOS or EOS) instead, "
                             f"as lm-eval does")
        by_ctx.setdefault(tuple(ctx), []).append((i, list(cont)))
    groups = []
    for ctx, members in by_ctx.items():
        longest = max(len(c) for _, c in members)
        if longest > max_length:
            raise ValueError(f"request {members[0][0]}: continuation of {longest} tokens exceeds the model's "
                             f"{max_length} positions")
        # like lm-eval: keep the last max_length + 1 tokens of context + continuation (the last is never an input)
        keep = max(1, max_length + 1 - longest)
        groups.append(_Group(list(ctx[-keep:]), members))
    groups.sort(key=lambda g: -(len(g.context) + max(len(c) for _, c in g.members)))
    return groups


def _batches(groups: list[_Group], batch_size: int) -> list[list[_Group]]:
    """Pack whole groups into batches of at most `batch_size` continuations (a bigger group goes alone)."""
    out: list[list[_Group]] = []
    cur: list[_Group] = []
    rows = 0
    for g in groups:
        if cur and rows + len(g.members) > batch_size:
            out.append(cur)
            cur, rows = [], 0
        cur.append(g)
        rows += len(g.members)
    if cur:
        out.append(cur)
    return out


def _score_batch(model: Transformer, groups: list[_Group]) -> list[tuple[int, float, bool]]:
    """Run the contexts of `groups` once (left-padded, into a KV cache), then every continuation on top of its
    context's cached keys/values; return (request index, Σ log p, is_greedy) per continuation."""
    device = model.device
    g_n = len(groups)
    tc = max(len(g.context) for g in groups)
    rows = [(gi, idx, cont) for gi, g in enumerate(groups) for idx, cont in g.members]
    tk = max(1, max(len(cont) for _, _, cont in rows))
    r_n = len(rows)

    ctx_ids = torch.zeros(g_n, tc, dtype=torch.long, device=device)  # (G, Tc), left-padded
    ctx_mask = torch.zeros(g_n, tc, dtype=torch.long, device=device)
    for gi, g in enumerate(groups):
        ctx_ids[gi, tc - len(g.context):] = torch.tensor(g.context, device=device)
        ctx_mask[gi, tc - len(g.context):] = 1
    cache = DenseKVCache(model.cfg, g_n, tc, device=device, dtype=model.embed.tokens.weight.dtype)
    first = model(ctx_ids, attention_mask=ctx_mask if tc != min(len(g.context) for g in groups) else None,
                  cache=cache, logits_to_keep=1).logits[:, -1]  # (G, V): predicts each first continuation token

    # expand the cached context to one row per continuation, with room for the continuations
    owner = torch.tensor([gi for gi, _, _ in rows], device=device)  # (R,)
    big = DenseKVCache(model.cfg, r_n, tc + tk, device=device, dtype=cache.k[0].dtype)
    for layer in range(model.cfg.num_layers):
        big.k[layer][:, :, :tc] = cache.k[layer].index_select(0, owner)  # (R, K, Tc, D)
        big.v[layer][:, :, :tc] = cache.v[layer].index_select(0, owner)
    big.pos = tc
    del cache

    cont_ids = torch.zeros(r_n, tk, dtype=torch.long, device=device)  # (R, Tk), right-padded
    cont_mask = torch.zeros(r_n, tk, dtype=torch.long, device=device)
    for r, (_, _, cont) in enumerate(rows):
        if cont:
            cont_ids[r, :len(cont)] = torch.tensor(cont, device=device)
            cont_mask[r, :len(cont)] = 1
    results = []
    if tk > 1:  # the last continuation token is never an input
        mask = torch.cat([ctx_mask.index_select(0, owner), cont_mask[:, :tk - 1]], dim=1)  # (R, Tc + Tk - 1)
        pos = mask.cumsum(-1)[:, tc:] - 1  # (R, Tk - 1): positions continue after each real context
        rest = model(cont_ids[:, :tk - 1], attention_mask=mask, position_ids=pos.clamp(min=0), cache=big).logits
        logits = torch.cat([first.index_select(0, owner)[:, None], rest], dim=1)  # (R, Tk, V)
    else:
        logits = first.index_select(0, owner)[:, None]  # (R, 1, V)
    logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # (R, Tk, V)
    picked = logp.gather(-1, cont_ids[:, :, None]).squeeze(-1)  # (R, Tk)
    greedy = logp.argmax(-1) == cont_ids  # (R, Tk)
    for r, (_, idx, cont) in enumerate(rows):
        n = len(cont)
        results.append((idx, float(picked[r, :n].sum()), bool(greedy[r, :n].all())))
    return results


def loglikelihood(model: Transformer, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                  batch_size: int = 16, max_length: int | None = None) -> list[tuple[float, bool]]:
    """(Σ log p(continuation | context), is_greedy) for each (context_ids, continuation_ids) request.

    Requests with the same context (the choices of one question) run that context once: contexts are forwarded
    into a KV cache, whose keys/values are then shared by every continuation of the group. `batch_size` bounds the
    continuations per forward pass. Contexts longer than `max_length` (default: the model's positions) lose tokens
    from the left, as in lm-eval. An empty continuation scores (0.0, True)."""
    max_length = max_length or model.cfg.max_position_embeddings
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), widened(model):
            for batch in _batches(_groups(requests, max_length), max(1, batch_size)):
                for idx, lp, greedy in _score_batch(model, batch):
                    out[idx] = (lp, greedy)
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def rolling_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, n_scored) over a sequence of `n_tokens` inputs (prefix + document): each window feeds
    tokens [start, end) and scores the predictions of its last `n_scored` positions (targets start+1 .. end).

    The first window scores every target it covers; each later one scores the next ≤ `stride` targets and is
    right-aligned to the last of them, so it sees max_length - n_scored tokens of earlier context. With
    stride == max_length this is lm-eval's `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], found {stride}")
    targets = n_tokens - 1  # predictions of positions 1 .. n_tokens - 1
    if targets <= 0:
        return []
    first = min(max_length, targets)
    wins = [(0, first, first)]
    done = first
    while done < targets:
        n = min(stride, targets - done)
        end = done + n  # last input position is end - 1, predicting target `end`
        wins.append((max(0, end - max_length), end, n))
        done = end
    return wins


def rolling_loglikelihood(model: Transformer, ids: Sequence[int], max_length: int, stride: int | None = None,
                          prefix_token_id: int | None = None, batch_size: int = 8) -> tuple[float, int]:
    """(Σ log p, tokens scored) of a long document `ids` with a sliding window of `max_length` tokens that moves
    `stride` tokens at a time (default max_length: disjoint windows, as lm-eval; smaller strides give each scored
    token more context at more compute).

    The first document token is conditioned on `prefix_token_id` when given — pass the BOS id, or EOS when the
    tokenizer has no BOS, which is what lm-eval's `loglikelihood_rolling` does (its `prefix_token_id`) — and then
    every token is scored; with None the first token is only context and len(ids) - 1 tokens are scored."""
    stride = stride or max_length
    seq = ([prefix_token_id] if prefix_token_id is not None else []) + list(ids)
    wins = rolling_windows(len(seq), max_length, stride)
    if not wins:
        return 0.0, 0
    device = model.device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), widened(model):
            for b in range(0, len(wins), batch_size):
                chunk = wins[b:b + batch_size]
                width = max(end - start for start, end, _ in chunk)
                x = torch.zeros(len(chunk), width + 1, dtype=torch.long, device=device)  # inputs + next targets
                for i, (start, end, _) in enumerate(chunk):
                    x[i, :end - start + 1] = torch.tensor(seq[start:end + 1], device=device)
                # windows are right-padded; a real token never attends to padding after it (causal)
                logits = model(x[:, :-1]).logits  # (W, width, V)
                logp = F.log_softmax(logits, dim=-1, dtype=torch.float32)
                tok = logp.gather(-1, x[:, 1:, None]).squeeze(-1)  # (W, width)
                for i, (start, end, n) in enumerate(chunk):
                    total += float(tok[i, end - start - n:end - start].sum())
                    count += n
    finally:
        model.train(was_training)
    return total, count


def bits_per_byte(sum_logprob_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte of text whose total log-likelihood is `sum_logprob_nats`: -Σ log p / (bytes · ln 2)."""
    if n_bytes <= 0:
        raise ValueError(f"n_bytes must be positive, found {n_bytes}")
    return -sum_logprob_nats / (n_bytes * math.log(2))
