"""GGUF files of the llama architecture: config, weights and tokenizer, read (dequantized via the `gguf` package, or
Q8_0 / Q4_0 / Q4_1 block linears kept as our codes) and written (floats, or a quantized model's codes as blocks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, one_line
from ..tokenizer.base import Tokenizer
from .gguf_blocks import BLOCK, BLOCK_TYPES, block_type, pack_blocks, unpack_blocks
from .transformer import ModelConfig

QUANT_METHOD_KEY = "lmforge.quantization.method"
"""GGUF metadata key holding how our codes were found ("rtn", "gptq"); llama.cpp ignores it."""

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
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError) as e:  # gguf's own checks
        raise InputError(f"{path}: not a readable GGUF file ({one_line(str(e))[:200]}); expected the GGUF magic, "
                         f"version, metadata and tensors (is it truncated?)") from None


def _fields(reader) -> dict[str, Any]:
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:  # noqa: BLE001 - unreadable metadata is skipped, weights do not depend on it
            continue
    return out


def config_from_gguf(meta: dict[str, Any], path: str | Path) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata describes; InputError naming the file and the missing or wrong key."""
    try:
        return _config_from_gguf(meta, path)
    except KeyError as e:
        raise InputError(f"{path}: GGUF metadata has no {e.args[0]!r}; expected it in a llama-style file") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: GGUF metadata does not describe a model lmforge can build ({e})") from None


def _config_from_gguf(meta: dict[str, Any], path: str | Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise InputError(f"{path}: GGUF architecture {arch!r} is not supported; expected llama, mistral or qwen2")
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
    cfg, sd, tok, _ = _read(path, dtype, keep_quantized=False)
    return cfg, sd, tok


def load_gguf_quantized(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[
        ModelConfig, dict[str, Tensor], Tokenizer, dict[str, Any] | None]:
    """Read a GGUF file keeping its Q8_0 / Q4_0 / Q4_1 block linears as codes in QuantLinear's state-dict format
    (`<name>.weight` codes, `.weight_scale` [, `.weight_min`], q/k rows un-permuted), everything else dequantized
    to `dtype`: (config, state dict, tokenizer, quantization_config or None when no block linear is one of those
    types). Only the most common of the three types is kept when they are mixed; the others are dequantized."""
    return _read(path, dtype, keep_quantized=True)


def _key(tensor_name: str) -> tuple[str, str | None, str]:
    """GGUF tensor name -> (name pattern with "{i}", block index or None, kind such as "weight")."""
    base, kind = tensor_name.rsplit(".", 1)
    if base.startswith("blk."):
        _, layer, rest = base.split(".", 2)
        return f"blk.{{i}}.{rest}", layer, kind
    return base, None, kind


def _block_linear(key: str, kind: str) -> bool:
    """A linear inside `blocks.*` (what QuantLinear replaces): attention q/k/v/o and the MLP's gate/up/down."""
    return kind == "weight" and key.startswith("blk.") and not key.endswith("norm")


def _read(path: str | Path, dtype: torch.dtype, keep_quantized: bool) -> tuple[
        ModelConfig, dict[str, Tensor], Tokenizer, dict[str, Any] | None]:
    reader = _reader(path)
    meta = _fields(reader)
    cfg = config_from_gguf(meta, path)
    kept = None
    if keep_quantized:
        counts: dict[str, int] = {}
        for t in reader.tensors:
            key, _, kind = _key(t.name)
            if _block_linear(key, kind) and t.tensor_type.name in BLOCK_TYPES:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        kept = max(counts, key=counts.__getitem__) if counts else None
    sd: dict[str, Tensor] = {}
    modules: list[str] = []
    for t in reader.tensors:
        key, layer, kind = _key(t.name)
        if key not in _NAMES:
            raise InputError(f"{path}: tensor {t.name!r} has no lmforge counterpart")
        heads = cfg.num_heads if key.endswith("attn_q") else cfg.num_kv_heads if key.endswith("attn_k") else 0
        name = _NAMES[key].replace("{i}", layer or "")
        if kept is not None and _block_linear(key, kind) and t.tensor_type.name == kept:
            for suffix, arr in zip(("weight", "weight_scale", "weight_min"), _codes(t, kept, path)):
                if arr is not None:
                    sd[f"{name}.{suffix}"] = torch.from_numpy(_unpermute(arr, heads) if heads else arr)
            modules.append(name)
            continue
        w = _tensor(t, path)
        if heads:
            w = _unpermute(w, heads)
        sd[f"{name}.{kind}"] = torch.from_numpy(np.array(w, copy=True)).to(dtype)
    cfg.tie_embeddings = "lm_head.weight" not in sd
    qcfg = None
    if modules:
        bits, symmetric = BLOCK_TYPES[kept]
        qcfg = {"quant_method": "lmforge", "method": str(meta.get(QUANT_METHOD_KEY, "rtn")), "bits": bits,
                "group_size": BLOCK, "symmetric": symmetric, "modules": modules}
    return cfg, sd, tokenizer_from_gguf(meta, path), qcfg


def _codes(t, kind: str, path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One Q8_0 / Q4_0 / Q4_1 tensor as (codes, fp16 scale, fp16 min or None) in our (rows, columns) order."""
    try:
        return unpack_blocks(kind, np.asarray(t.data))
    except ValueError as e:
        raise InputError(f"{path}: tensor {t.name!r} ({kind}) cannot be read ({e}); is the file truncated?") from None


def _tensor(t, path: str | Path) -> np.ndarray:
    """One GGUF tensor dequantized to float32 in our (rows, columns) order; InputError naming the file and tensor
    when its bytes do not fit its shape (a truncated file)."""
    from gguf import dequantize

    shape = tuple(reversed([int(x) for x in t.shape]))
    try:
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise InputError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}, shape {shape}) cannot be read "
                         f"({one_line(str(e))[:200]}); is the file truncated?") from None


def load_gguf_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer of a GGUF file (no weights are read)."""
    return tokenizer_from_gguf(_fields(_reader(path)), path)


def tokenizer_from_gguf(meta: dict[str, Any], path: str | Path) -> Tokenizer:
    """Build an HF `tokenizers` byte-level BPE from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(f"{path}: GGUF tokenizer model {kind!r} is not supported yet; expected 'gpt2' (byte-level "
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


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (inverse of `_unpermute`)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(tok: Tokenizer) -> dict[str, Any]:
    """Vocabulary, merges, token types and pre-tokenizer name of a byte-level BPE tokenizer."""
    import json

    spec = json.loads(tok.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ValueError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama-3, SmolLM2, Qwen2 style); "
                         f"this tokenizer is {model.get('type')} with a {spec.get('decoder', {}).get('type')} decoder")
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    special = {t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = json.dumps(spec.get("pre_tokenizer"))
    return {"tokens": tokens, "types": [3 if t in special else 1 for t in tokens], "merges": merges,
            "pre": "smollm" if '"individual_digits": true' in pre else "gpt-2"}


def save_gguf(model, tok: Tokenizer, path: str | Path, dtype: str = "f32") -> Path:
    """Write a llama-architecture GGUF. Float tensors in `dtype` (f32, f16 or bf16; norms always f32); the block
    linears of a quantized model (QuantLinear codes, group 32) as Q8_0 / Q4_0 / Q4_1 blocks copied from its codes,
    so llama.cpp computes with exactly our quantized weights."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, quantize

    cfg = model.cfg
    if cfg.family not in ("llama", "mistral") or cfg.head != "lm" or cfg.qkv_bias or cfg.out_bias or cfg.mlp_bias:
        raise ValueError(f"GGUF export supports llama/mistral causal LMs without biases; got family {cfg.family!r} "
                         f"with head {cfg.head!r}")
    if cfg.rope_scaling:
        raise ValueError("GGUF export of scaled RoPE is not supported yet")
    floats = {"f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
              "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
              "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16)}
    if dtype not in floats:
        raise ValueError(f"GGUF dtype {dtype!r} is not supported; expected one of {sorted(floats)} (quantized "
                         f"types come from a quantized model's codes)")
    qtype, ftype = floats[dtype]
    sd = model.state_dict()
    blocks, method = quantized_layers(model, sd)
    if blocks:
        kinds = list(blocks.values())
        ftype = LlamaFileType[f"MOSTLY_{max(set(kinds), key=kinds.count)}"]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    w = GGUFWriter(tmp, "llama")
    w.add_name(path.stem)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(ftype)
    if blocks:
        w.add_quantization_version(GGML_QUANT_VERSION)
        if method:
            w.add_string(QUANT_METHOD_KEY, method)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    if cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    meta = _tokenizer_metadata(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["pre"])
    w.add_token_list(meta["tokens"])
    w.add_token_types(meta["types"])
    w.add_token_merges(meta["merges"])
    for name, tid in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id),
                      ("unk", tok.token_id(tok.unk_token))):
        if tid is not None:
            getattr(w, f"add_{name}_token_id")(tid)
    w.add_add_bos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)
    ours_to_gguf = {v: k for k, v in _NAMES.items()}
    for name, t in sd.items():
        base, kind = name.rsplit(".", 1)
        if kind in ("weight_scale", "weight_min"):  # written inside their layer's blocks
            continue
        layer = base.split(".")[1] if base.startswith("blocks.") else None
        key = base.replace(f"blocks.{layer}.", "blocks.{i}.") if layer else base
        heads = {"blocks.{i}.attn.q": cfg.num_heads, "blocks.{i}.attn.k": cfg.num_kv_heads}.get(key, 0)
        gname = ours_to_gguf[key].replace("{i}", layer or "") + "." + kind
        if base in blocks and kind == "weight":  # codes, scales [and mins]: rows permute together, groups run along in
            parts = [None if x is None else x.detach().cpu().numpy()
                     for x in (t, sd[f"{base}.weight_scale"], sd.get(f"{base}.weight_min"))]
            if heads:
                parts = [None if x is None else _permute(x, heads) for x in parts]
            w.add_tensor(gname, pack_blocks(blocks[base], *parts), raw_dtype=GGMLQuantizationType[blocks[base]])
            continue
        arr = t.detach().float().cpu().numpy()
        if heads:
            arr = _permute(arr, heads)
        if arr.ndim == 1 or qtype == GGMLQuantizationType.F32:  # norms stay f32, as llama.cpp writes them
            w.add_tensor(gname, arr.astype(np.float32))
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return path


def quantized_layers(model, sd: dict[str, Tensor] | None = None) -> tuple[dict[str, str], str | None]:
    """The model's quantized linears (a `<name>.weight_scale` beside `<name>.weight`) -> their GGUF block type,
    and how the codes were found ("rtn", "gptq") when the model says; ValueError for settings no type stores.

    A layer's settings are its `bits`, `group_size`, `symmetric` (and `method`) attributes, QuantLinear's; else
    the model's config.json-style `quantization_config` dict (on `model.cfg` or on the model)."""
    sd = model.state_dict() if sd is None else sd
    qcfg = getattr(model.cfg, "quantization_config", None) or getattr(model, "quantization_config", None) or {}
    keys = ("bits", "group_size", "symmetric")
    out, methods = {}, set()
    for key in sd:
        if not key.endswith(".weight_scale"):
            continue
        name = key[:-len(".weight_scale")]
        mod = model.get_submodule(name)
        if all(hasattr(mod, a) for a in keys):
            settings, method = [getattr(mod, a) for a in keys], getattr(mod, "method", None)
        elif isinstance(qcfg, dict) and all(a in qcfg for a in keys):
            settings, method = [qcfg[a] for a in keys], qcfg.get("method")
        else:
            raise ValueError(f"{name}: has quantized codes but neither bits/group_size/symmetric attributes nor a "
                             f"quantization_config with those keys; expected a QuantLinear")
        out[name] = block_type(*settings, what=name)
        methods.add(method)
    return out, methods.pop() if len(methods) == 1 else None
