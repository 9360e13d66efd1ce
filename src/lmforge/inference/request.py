"""A request's life in the engine: the state the engine keeps per sequence (`SeqState`), the progress it reports
(`RequestOutput`), and `Stream`, the outputs of requests added together, step by step, until all have finished."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal

import torch

from .sampling import SamplingParams, StopStrings, TokenLogprob

__all__ = ["AdapterNotFound", "RequestOutput", "SeqState", "Stream", "join_outputs"]


class AdapterNotFound(KeyError):
    """A request named an adapter the engine has not loaded (the server answers 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "adapter not found"


@dataclass
class RequestOutput:
    """Progress of one request: the tokens and text it gained in a step (everything, from `generate`)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: Literal["stop", "length", "abort"] | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class SeqState:
    """What the engine keeps for one running or waiting request (engine-internal: compared by identity)."""

    id: str
    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    generator: torch.Generator | None
    stops: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # virtual prompt-tuning placeholders (< 0) + prompt + output
    start: int = 0  # where the output begins in tokens
    table: list[int] = field(default_factory=list)  # KV blocks, in order
    cached: int = 0  # tokens whose keys/values are in the cache
    draft_cached: int = 0  # the same for the draft model
    queued: int = 0  # the engine step it (re)joined the waiting queue at; preempted ones sort first
    hashes: list[int] = field(default_factory=list)  # chain hashes of the blocks registered for sharing
    pending: str = ""  # decoded text not yet returned (at most a held-back tail plus the newest piece)
    watch: StopStrings | None = None  # the request's stop strings, matched as text arrives
    offsets: tuple[int, int] = (0, 0)  # incremental detokenization: (prefix, read) token offsets into output
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    # what this step produced, returned by step()
    new_tokens: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def output(self) -> list[int]:
        return self.tokens[self.start:]

    @property
    def n_output(self) -> int:
        """len(self.output) without copying it."""
        return len(self.tokens) - self.start


class Stream:
    """The outputs of requests added together (`Engine.stream`), one list per engine step until all have finished.

    A list may be empty (a step that only prefilled a chunk of a long prompt), so a caller can act between any two
    steps, e.g. stop on Ctrl-C. Outputs of other requests stepped meanwhile are dropped, as `Engine.generate` always
    did. Leaving early (`close`, or a `with` block ending by break or exception) aborts the unfinished requests
    without reporting them, so the engine is left as if they had never been added."""

    def __init__(self, ids: list[str], step: Callable[[], list[RequestOutput]], forget: Callable[[str], None]):
        self.ids = ids
        """Request ids, in the order the prompts were given."""
        self.unfinished = set(ids)
        self._step, self._forget = step, forget

    @property
    def done(self) -> bool:
        """Whether every request has finished (or been closed)."""
        return not self.unfinished

    def __iter__(self) -> Iterator[list[RequestOutput]]:
        return self

    def __next__(self) -> list[RequestOutput]:
        if not self.unfinished:
            raise StopIteration
        outs = [o for o in self._step() if o.request_id in self.unfinished]
        self.unfinished.difference_update(o.request_id for o in outs if o.finished)
        return outs

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Abort the requests that have not finished (a no-op once all have)."""
        for rid in self.ids:
            if rid in self.unfinished:
                self._forget(rid)
        self.unfinished.clear()


def join_outputs(parts: list[RequestOutput]) -> RequestOutput:
    """One request's step outputs as one: all its tokens, text and log-probs, and how it finished."""
    last = parts[-1]
    lps = [lp for p in parts for lp in (p.logprobs or [])] if last.logprobs is not None else None
    return RequestOutput(last.request_id, [t for p in parts for t in p.token_ids], "".join(p.text for p in parts),
                         lps, True, last.finish_reason, last.prompt_tokens, last.completion_tokens)
