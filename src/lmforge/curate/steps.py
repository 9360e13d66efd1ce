"""The curation steps by name: which are corpus-wide dedups, and how each is built from its config section (in the
worker that runs it; heavy libraries and models load there, once per process)."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["CORPUS_STEPS", "STEPS", "build"]

CORPUS_STEPS = {"exact_dedup", "near_dedup", "perplexity_buckets"}
"""Steps that need the whole corpus (the run cuts the recipe into phases at them)."""


STEPS: dict[str, tuple[str, str]] = {
    "language": ("language", "Language"), "quality": ("quality", "Quality"), "exact_dedup": ("exact", "ExactDedup"),
    "near_dedup": ("minhash", "NearDedup"), "pii": ("pii", "PII"), "toxicity": ("toxicity", "Toxicity"),
    "perplexity": ("perplexity", "Perplexity"), "perplexity_buckets": ("perplexity", "PerplexityBuckets"),
    "decontaminate": ("decontaminate", "Decontaminate")}
"""Step name -> (module of lmforge.curate, class); modules are imported only when their step is built."""


def build(name: str, cfg: Any) -> Any:
    """The step `name` (a Filter or a CorpusStep) from its config section."""
    if name not in STEPS:
        raise ValueError(f"unknown curation step {name!r}; expected one of {', '.join(STEPS)}")
    module, cls = STEPS[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)(cfg)
