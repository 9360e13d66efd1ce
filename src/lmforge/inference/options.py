"""`Decoding` and `SamplingOptions`: the sampling keys a config section offers its user, declared once. Importing
it costs no torch (config handling and `--help` must not pay for it); `params` turns the options into the engine's
SamplingParams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sampling import SamplingParams

__all__ = ["Decoding", "SamplingOptions"]


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
