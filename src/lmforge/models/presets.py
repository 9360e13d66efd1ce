"""Named model sizes: data only. `preset(name, **overrides)` builds a ModelConfig from one."""

from __future__ import annotations

from typing import Any

from .transformer import ModelConfig

_LLAMA = dict(family="llama", norm="rmsnorm", position="rope", mlp="gated", activation="silu")
_GPT2 = dict(family="gpt2", norm="layernorm", norm_bias=True, position="learned", mlp="plain",
             activation="gelu_tanh", qkv_bias=True, out_bias=True, mlp_bias=True, norm_eps=1e-5)
_BERT = dict(family="bert", causal=False, norm="layernorm", norm_bias=True, norm_eps=1e-12, norm_position="post",
             position="learned", mlp="plain", activation="gelu", qkv_bias=True, out_bias=True, mlp_bias=True,
             type_vocab_size=2, embed_norm=True, final_norm=False, head="pretraining")

PRESETS: dict[str, dict[str, Any]] = {
    # decoders, Llama style
    "llama-tiny": dict(_LLAMA, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                       vocab_size=512, max_position_embeddings=256),
    "llama-7m": dict(_LLAMA, hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=768,
                     vocab_size=8192, max_position_embeddings=512),
    "llama-10m": dict(_LLAMA, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2, intermediate_size=1024,
                      vocab_size=8192, max_position_embeddings=512),
    "llama-30m": dict(_LLAMA, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408,
                      vocab_size=16384, max_position_embeddings=1024),
    "smollm2-135m": dict(_LLAMA, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0),
    "smollm2-360m": dict(_LLAMA, hidden_size=960, num_layers=32, num_heads=15, num_kv_heads=5,
                         intermediate_size=2560, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0),
    # decoders, GPT-2 style
    "gpt2-tiny": dict(_GPT2, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, vocab_size=512,
                      max_position_embeddings=256),
    "gpt2-124m": dict(_GPT2, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=50257,
                      max_position_embeddings=1024),
    # encoders, BERT style
    "bert-tiny": dict(_BERT, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, vocab_size=512,
                      max_position_embeddings=256),
    "bert-mini": dict(_BERT, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, vocab_size=8192,
                      max_position_embeddings=512),
    "bert-base": dict(_BERT, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, vocab_size=30522,
                      max_position_embeddings=512),
}


def check_preset(name: str) -> None:
    """ValueError naming the nearest known preset when `name` is not one (configs call it before anything runs)."""
    if name not in PRESETS:
        import difflib

        near = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown model preset {name!r}{hint} (known: {', '.join(PRESETS)})")


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a named size, with fields overridden (e.g. vocab_size of a trained tokenizer)."""
    check_preset(name)
    return ModelConfig(**{**PRESETS[name], **overrides})
