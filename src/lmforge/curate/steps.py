"""The curation steps by name: which are corpus-wide dedups, and how each is built from its config section (in the
worker that runs it; heavy libraries and models load there, once per process)."""

from __future__ import annotations

from typing import Any

__all__ = ["CORPUS_STEPS", "build"]

CORPUS_STEPS = {"exact_dedup", "near_dedup", "perplexity_buckets"}
"""Steps that need the whole corpus (the run cuts the recipe into phases at them)."""


def build(name: str, cfg: Any) -> Any:
    """The step `name` (a Filter or a CorpusStep) from its config section."""
    if name == "exact_dedup":
        from .exact import ExactDedup

        return ExactDedup(cfg)
    if name == "language":
        from .language import Language

        return Language(cfg)
    if name == "quality":
        from .quality import Quality

        return Quality(cfg)
    if name == "near_dedup":
        from .minhash import NearDedup

        return NearDedup(cfg)
    if name == "pii":
        from .pii import PII

        return PII(cfg)
    if name == "toxicity":
        from .toxicity import Toxicity

        return Toxicity(cfg)
    if name == "perplexity":
        from .perplexity import Perplexity

        return Perplexity(cfg)
    if name == "perplexity_buckets":
        from .perplexity import PerplexityBuckets

        return PerplexityBuckets(cfg)
    if name == "decontaminate":
        from .decontaminate import Decontaminate

        return Decontaminate(cfg)
    raise ValueError(f"unknown curation step {name!r}")
