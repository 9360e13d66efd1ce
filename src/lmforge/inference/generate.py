"""Plain batched generation with a contiguous KV cache (the paged, continuously batched engine builds on this)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ..models.transformer import DenseKVCache, Transformer


@dataclass
class SamplingParams:
    """How the next token is chosen."""

    max_new_tokens: int = 128
    """Stop after this many new tokens."""
    temperature: float = 0.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    seed: int | None = None
    """Random seed for sampling (same seed, same text)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a sequence (the eos token is added by callers)."""


def sample_next(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Pick next tokens (B,) from logits (B, V)."""
    if p.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
    if p.top_k > 0:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_stream(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams
                    ) -> Iterator[list[int | None]]:
    """Yield, at each step, the new token of every sequence (None for finished ones). Prompts are left-padded."""
    device = model.device
    b = len(prompts)
    longest = max(len(x) for x in prompts)
    if longest == 0:
        raise ValueError("empty prompt: give at least one token")
    limit = model.cfg.max_position_embeddings
    if longest + params.max_new_tokens > limit:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                         f"model's context length {limit}")
    pad = 0
    ids = torch.full((b, longest), pad, dtype=torch.long, device=device)
    mask = torch.zeros((b, longest + params.max_new_tokens), dtype=torch.long, device=device)
    for i, x in enumerate(prompts):
        ids[i, longest - len(x):] = torch.tensor(list(x), dtype=torch.long)
        mask[i, longest - len(x):longest] = 1
    dtype = next(model.parameters()).dtype
    cache = DenseKVCache(model.cfg, b, longest + params.max_new_tokens, device=device, dtype=dtype)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device).manual_seed(params.seed)
    stops = torch.tensor(params.stop_token_ids or [-1], device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    full_mask = None if all(len(x) == longest for x in prompts) else mask
    logits = model(ids, attention_mask=None if full_mask is None else mask[:, :longest], cache=cache,
                   logits_to_keep=1).logits[:, -1]  # (B, V)
    for step in range(params.max_new_tokens):
        nxt = sample_next(logits, params, gen)  # (B,)
        out = [None if done[i] else int(nxt[i]) for i in range(b)]
        yield out
        done |= torch.isin(nxt, stops)
        if bool(done.all()) or step == params.max_new_tokens - 1:
            return
        t = longest + step
        mask[:, t] = 1
        logits = model(nxt[:, None], attention_mask=None if full_mask is None else mask[:, :t + 1], cache=cache,
                       logits_to_keep=1).logits[:, -1]


def generate(model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
    """New tokens for each prompt (stop tokens included when hit)."""
    outs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, params):
        for i, t in enumerate(step):
            if t is not None:
                outs[i].append(t)
    return outs
