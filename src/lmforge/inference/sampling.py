"""Choosing the next token: per-request sampling parameters applied to a batch of logits rows (penalties,
temperature, top-k, top-p), greedy or seeded sampling, and log-probabilities of the chosen and top tokens."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor


class RequestError(ValueError):
    """A request the engine cannot run (the server answers 400); the message is meant for the user."""


@dataclass
class SamplingParams:
    """How a request's tokens are chosen and when it stops."""

    max_new_tokens: int = 128
    """Stop after this many new tokens."""
    temperature: float = 0.0
    """0 is greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    repetition_penalty: float = 1.0
    """CTRL-style penalty on tokens already in the prompt or output: positive logits / p, negative logits * p."""
    presence_penalty: float = 0.0
    """OpenAI presence penalty: subtracted from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI frequency penalty: subtracted once per earlier occurrence in the generated text."""
    seed: int | None = None
    """Seed of this request's own random generator: the same seed gives the same text, whatever else runs."""
    stop: tuple[str, ...] = ()
    """Strings that end the text (not included in it)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the text, besides the model's end-of-sequence tokens."""
    ignore_eos: bool = False
    """Keep going past end-of-sequence tokens (benchmarks)."""
    logprobs: int | None = None
    """None: no log-probs; 0: the chosen token's; k: also the k most likely alternatives."""

    def validate(self) -> None:
        """Raise RequestError on values no request can run with."""
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1", self.max_new_tokens),
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be >= 0", self.temperature),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p),
            (self.top_k >= 0, "top_k must be >= 0", self.top_k),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0", self.repetition_penalty),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]", self.presence_penalty),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]", self.frequency_penalty),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]", self.logprobs),
        ]
        for ok, message, found in checks:
            if not ok:
                raise RequestError(f"{message}, found {found}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError(f"stop strings must be non-empty strings, found {list(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class TokenLogprob:
    """Log-probability of a chosen token under the model, and the most likely alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def apply_penalties(logits: Tensor, params: SamplingParams, prompt: Sequence[int], output: Sequence[int]) -> Tensor:
    """Penalised copy of one row of logits (V,): repetition over prompt + output, presence/frequency over output."""
    logits = logits.clone()
    if params.repetition_penalty != 1:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = Counter(output)
        ids = torch.tensor(list(counts), dtype=torch.long, device=logits.device)
        n = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * n
    return logits


def processed_logprobs(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Log-probabilities (R, V) of the distribution each sampling row draws from: temperature, then top-k and
    top-p (the smallest set reaching top_p, the crossing token kept). Greedy rows keep temperature 1."""
    logits = logits.float()
    temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
    logits = logits / temp[:, None]
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(top_k) or any(p < 1 for p in top_p):
        v = logits.shape[-1]
        sorted_logits, order = logits.sort(-1, descending=True)  # (R, V)
        rank = torch.arange(v, device=logits.device)
        k = torch.tensor([k if k > 0 else v for k in top_k], device=logits.device)
        drop = rank[None] >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
        drop |= before >= torch.tensor(top_p, device=logits.device)[:, None]
        kept = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, kept)
    return logits.log_softmax(-1)


def choose(logprobs: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
           ) -> list[int]:
    """One token per row: argmax for greedy rows, a draw with the row's own generator otherwise."""
    out = logprobs.argmax(-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = int(torch.multinomial(logprobs[i].exp(), 1, generator=generators[i]))
    return out


def token_logprobs(raw_logits: Tensor, chosen: Sequence[int], k: int) -> list[TokenLogprob]:
    """Model log-probabilities (before sampling transforms) of `chosen` tokens for rows (R, V), with top-k."""
    lp = raw_logits.float().log_softmax(-1)
    picked = lp.gather(-1, torch.tensor(chosen, device=lp.device)[:, None]).squeeze(-1).tolist()
    top_v, top_i = (lp.topk(k, -1) if k else (lp[:, :0], lp[:, :0].long()))
    return [TokenLogprob(c, lp_c, list(zip(ti, tv))) for c, lp_c, ti, tv in
            zip(chosen, picked, top_i.tolist(), top_v.tolist())]


class StopStrings:
    """Watches text that arrives piece by piece for stop strings, in time linear in the text: one Knuth-Morris-Pratt
    automaton per stop string (Knuth, Morris and Pratt, 1977), so no step rescans or copies what came before.
    `feed` says where the first stop string begins; `hold` is how many trailing characters may still grow into
    one (a stream holds them back)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.fail = [_prefix_function(s) for s in self.stops]
        self.state = [0] * len(self.stops)  # characters of each stop string matched at the end of the text
        self.fed = 0

    def feed(self, piece: str) -> int | None:
        """Advance over `piece`; the offset (in all the text fed so far) where the earliest stop string completed
        in it begins, or None."""
        first = None
        for j, stop in enumerate(self.stops):
            state, fail = self.state[j], self.fail[j]
            for i, ch in enumerate(piece):
                while state and stop[state] != ch:
                    state = fail[state - 1]
                if stop[state] == ch:
                    state += 1
                if state == len(stop):
                    at = self.fed + i + 1 - len(stop)
                    first = at if first is None else min(first, at)
                    state = 0
                    break
            self.state[j] = state
        self.fed += len(piece)
        return first

    @property
    def hold(self) -> int:
        """Characters at the end of the text that are the beginning of some stop string."""
        return max(self.state, default=0)


def _prefix_function(s: str) -> list[int]:
    """KMP prefix function: p[i] = length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    p = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        ch = s[i]
        while k and s[k] != ch:
            k = p[k - 1]
        if s[k] == ch:
            k += 1
        p[i] = k
    return p
