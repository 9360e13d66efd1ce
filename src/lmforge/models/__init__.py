"""The one model file, named sizes, and import/export adapters."""

from .transformer import DenseKVCache, KVCache, ModelConfig, ModelOutput, Transformer

__all__ = ["ModelConfig", "ModelOutput", "Transformer", "KVCache", "DenseKVCache"]
