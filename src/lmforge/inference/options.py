"""`Decoding` and `SamplingOptions`: the sampling keys a config section offers its user, declared once; and
`EngineConfig`, the engine's own settings. Importing it costs no torch (config handling and `--help` must not pay
for it); `params` turns the options into the engine's SamplingParams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .sampling import SamplingParams

__all__ = ["Decoding", "SamplingOptions", "EngineConfig"]


@dataclass
class Decoding:
    """How new tokens are chosen and how many: the keys every config section that generates offers (generate, chat,
    RL sampling, evaluation), declared once. A section inherits them and redeclares a field to change its default
    or description (the key keeps its place)."""

    max_new_tokens: int = 128
    """Stop after this many new tokens."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = no limit)."""


@dataclass
class SamplingOptions(Decoding):
    """Sampling keys of a section that generates for a person (`generate`, `chat`): Decoding's, a repetition
    penalty and a seed."""

    repetition_penalty: float = 1.0
    """Penalty (> 1) on tokens already in the prompt or the reply."""
    seed: int | None = None
    """Random seed: the same seed gives the same text."""

    def validate(self) -> None:
        self.params().validate()  # RequestError is a ValueError naming the field and value

    def params(self, seed_offset: int = 0) -> SamplingParams:
        """The engine's parameters; `seed_offset` varies a set seed per request (a chat's turn)."""
        from .sampling import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                              seed=None if self.seed is None else self.seed + seed_offset)


@dataclass
class EngineConfig:
    """Memory and scheduling limits of the engine."""

    block_size: int = 16
    """Token slots per KV-cache block."""
    kv_cache_gb: float | None = None
    """Memory for keys and values (the draft model's included); sets the number of blocks. None: enough for
    max_running sequences of full context length, at most 1 GiB."""
    max_running: int = 64
    """Most sequences decoded together."""
    max_batch_tokens: int = 2048
    """Most tokens in one forward pass: decode tokens plus prompt chunks (longer prompts are prefilled in chunks)."""
    max_prefill_tokens: int = 512
    """Most prompt tokens in one forward pass. A burst of prompts is prefilled a chunk at a time, oldest first, so
    each request streams once its own prompt is in (not the whole burst's) and running ones keep decoding."""
    prefix_caching: bool = True
    """Share the KV blocks of identical prompt prefixes between requests."""
    pack_weights: bool = True
    """On CPU, run linear layers on oneDNN-packed copies of the weights (about 2x faster decoding, one extra
    copy of the weights in memory)."""
    native_decode: bool = True
    """On CPU, run steps that decode one token per sequence through the native C++ step (inference/native):
    every layer in one call, weights read in their stored precision. Falls back to PyTorch where it cannot build
    or the model is not covered; `Engine.decode_path` says which path runs and why."""
    speculative: Literal["none", "ngram", "draft"] = "none"
    """Speculative decoding: none, prompt lookup (n-grams of the sequence itself) or a draft model."""
    num_speculative_tokens: int = 4
    """Tokens proposed per step when speculating."""
    ngram_max: int = 4
    """Prompt lookup: longest suffix n-gram searched for earlier in the sequence."""
    ngram_min: int = 1
    """Prompt lookup: shortest n-gram that may match."""

    def validate(self) -> None:
        if min(self.block_size, self.max_running, self.max_batch_tokens, self.max_prefill_tokens) < 1:
            raise ValueError("block_size, max_running, max_batch_tokens and max_prefill_tokens must be >= 1")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, found {self.kv_cache_gb}")
        if self.speculative not in ("none", "ngram", "draft"):
            raise ValueError(f"speculative must be none, ngram or draft, found {self.speculative!r}")
        if self.num_speculative_tokens < 1 or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("num_speculative_tokens must be >= 1 and 1 <= ngram_min <= ngram_max")
