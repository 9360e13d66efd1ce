"""GGUF files of the llama architecture: config, dequantized weights (via the `gguf` package) and tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..tokenizer.base import Tokenizer
from .transformer import ModelConfig

# GGUF tensor name -> ours ("{i}" = block index)
_NAMES = {
    "token_embd": "embed.tokens",
    "output_norm": "norm",
    "output": "lm_head",
    "blk.{i}.attn_q": "blocks.{i}.attn.q",
    "blk.{i}.attn_k": "blocks.{i}.attn.k",
    "blk.{i}.attn_v": "blocks.{i}.attn.v",
    "blk.{i}.attn_output": "blocks.{i}.attn.o",
    "blk.{i}.ffn_gate": "blocks.{i}.mlp.gate",
    "blk.{i}.ffn_up": "blocks.{i}.mlp.up",
    "blk.{i}.ffn_down": "blocks.{i}.mlp.down",
    "blk.{i}.attn_norm": "blocks.{i}.attn_norm",
    "blk.{i}.ffn_norm": "blocks.{i}.mlp_norm",
}


def _reader(path: str | Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'lmforge[gguf]'") from None
    return GGUFReader(str(path))


def _fields(reader) -> dict[str, Any]:
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:  # noqa: BLE001 - unreadable metadata is skipped, weights do not depend on it
            continue
    return out


def config_from_gguf(meta: dict[str, Any], path: str | Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; expected llama, mistral or qwen2")
    a = arch

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{a}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    return ModelConfig(
        family="llama" if arch == "llama" else arch, vocab_size=len(meta["tokenizer.ggml.tokens"]),
        hidden_size=hidden, num_layers=get("block_count"), num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads), head_dim=get("attention.key_length", hidden // heads),
        intermediate_size=get("feed_forward_length"), max_position_embeddings=get("context_length", 2048),
        norm="rmsnorm", norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)), qkv_bias=arch == "qwen2",
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half layout)."""
    rows = w.shape[0]
    # rows of a head are stored as (D/2 pairs, 2); rotate-half wants (2, D/2)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, Tensor],
                                                                             Tokenizer]:
    """Read a GGUF file: (config, our state dict dequantized to `dtype`, tokenizer)."""
    from gguf import dequantize

    reader = _reader(path)
    meta = _fields(reader)
    cfg = config_from_gguf(meta, path)
    sd: dict[str, Tensor] = {}
    for t in reader.tensors:
        parts = t.name.rsplit(".", 1)
        base, kind = parts[0], parts[1]
        layer = None
        if base.startswith("blk."):
            _, layer, rest = base.split(".", 2)
            key = f"blk.{{i}}.{rest}"
        else:
            key = base
        if key not in _NAMES:
            raise ValueError(f"{path}: tensor {t.name!r} has no lmforge counterpart")
        w = dequantize(t.data, t.tensor_type)
        w = np.asarray(w, dtype=np.float32).reshape(tuple(reversed([int(x) for x in t.shape])))
        if key.endswith("attn_q"):
            w = _unpermute(w, cfg.num_heads)
        elif key.endswith("attn_k"):
            w = _unpermute(w, cfg.num_kv_heads)
        name = _NAMES[key].replace("{i}", layer or "")
        sd[f"{name}.{kind}"] = torch.from_numpy(np.array(w, copy=True)).to(dtype)
    cfg.tie_embeddings = "lm_head.weight" not in sd
    return cfg, sd, tokenizer_from_gguf(meta, path)


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer of a GGUF file (no weights are read)."""
    return tokenizer_from_gguf(_fields(_reader(path)), path)


def tokenizer_from_gguf(meta: dict[str, Any], path: str | Path) -> Tokenizer:
    """Build an HF `tokenizers` byte-level BPE from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported yet; expected 'gpt2' (byte-level "
                         "BPE). Convert the model with its tokenizer.json instead.")
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in ("smollm", "starcoder", "refact", "qwen2", "deepseek-coder"):
        # these split every digit on its own before the GPT-2 regex (as llama.cpp and the original tokenizer.json do)
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        backend.pre_tokenizer = byte_level
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"), byte_level])
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type")
    specials = [tokens[i] for i, ty in enumerate(types) if int(ty) in (3, 4)] if types is not None else []
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    if meta.get("tokenizer.ggml.add_bos_token") and tok("bos"):
        from tokenizers import processors
        bos = tok("bos")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return Tokenizer(backend=backend, bos_token=tok("bos"), eos_token=tok("eos"), pad_token=tok("padding"),
                     unk_token=tok("unknown"), chat_template=meta.get("tokenizer.chat_template"),
                     model_max_length=meta.get(f"{meta.get('general.architecture')}.context_length"))
