"""lmforge: the language-model lifecycle in one toolkit."""

from __future__ import annotations

from typing import Any

from .version import __version__
__all__ = ["load", "save", "load_tokenizer", "Transformer", "ModelConfig", "Tokenizer", "__version__"]


def __getattr__(name: str) -> Any:
    # lazy: `lmforge --help` and config handling must not pay for importing torch
    if name == "load":  # models, and adapter folders resolved to their base model with the adapter applied
        from .transforms.peft import load

        return load
    if name in ("save", "load_tokenizer"):
        from .models import loading

        return getattr(loading, name)
    if name in ("Transformer", "ModelConfig"):
        from .models import transformer

        return getattr(transformer, name)
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
