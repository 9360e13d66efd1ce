"""Hugging Face model folders: config.json maps and state-dict name maps, in both directions.

Supported `model_type`s: llama, mistral, qwen2 (and any Llama-shaped decoder), gpt2, bert.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, read_json_object
from .transformer import ModelConfig

DECODERS = ("llama", "mistral", "qwen2")
FAMILIES = DECODERS + ("gpt2", "bert")

# our name <-> HF name (without the model prefix), "{i}" = layer index
_NAMES: dict[str, dict[str, str]] = {
    "llama": {
        "embed.tokens": "embed_tokens",
        "blocks.{i}.attn.q": "layers.{i}.self_attn.q_proj",
        "blocks.{i}.attn.k": "layers.{i}.self_attn.k_proj",
        "blocks.{i}.attn.v": "layers.{i}.self_attn.v_proj",
        "blocks.{i}.attn.o": "layers.{i}.self_attn.o_proj",
        "blocks.{i}.mlp.gate": "layers.{i}.mlp.gate_proj",
        "blocks.{i}.mlp.up": "layers.{i}.mlp.up_proj",
        "blocks.{i}.mlp.down": "layers.{i}.mlp.down_proj",
        "blocks.{i}.attn_norm": "layers.{i}.input_layernorm",
        "blocks.{i}.mlp_norm": "layers.{i}.post_attention_layernorm",
        "norm": "norm",
    },
    "gpt2": {
        "embed.tokens": "wte",
        "embed.positions": "wpe",
        "blocks.{i}.attn_norm": "h.{i}.ln_1",
        "blocks.{i}.attn.qkv": "h.{i}.attn.c_attn",  # fused, Conv1D (in, out) layout: split below
        "blocks.{i}.attn.o": "h.{i}.attn.c_proj",
        "blocks.{i}.mlp_norm": "h.{i}.ln_2",
        "blocks.{i}.mlp.up": "h.{i}.mlp.c_fc",
        "blocks.{i}.mlp.down": "h.{i}.mlp.c_proj",
        "norm": "ln_f",
    },
    "bert": {
        "embed.tokens": "embeddings.word_embeddings",
        "embed.positions": "embeddings.position_embeddings",
        "embed.token_types": "embeddings.token_type_embeddings",
        "embed.norm": "embeddings.LayerNorm",
        "blocks.{i}.attn.q": "encoder.layer.{i}.attention.self.query",
        "blocks.{i}.attn.k": "encoder.layer.{i}.attention.self.key",
        "blocks.{i}.attn.v": "encoder.layer.{i}.attention.self.value",
        "blocks.{i}.attn.o": "encoder.layer.{i}.attention.output.dense",
        "blocks.{i}.attn_norm": "encoder.layer.{i}.attention.output.LayerNorm",
        "blocks.{i}.mlp.up": "encoder.layer.{i}.intermediate.dense",
        "blocks.{i}.mlp.down": "encoder.layer.{i}.output.dense",
        "blocks.{i}.mlp_norm": "encoder.layer.{i}.output.LayerNorm",
        "pooler": "pooler.dense",
    },
}
# head modules live outside the body prefix
_HEADS: dict[str, dict[str, str]] = {
    "llama": {"lm_head": "lm_head", "score": "score", "qa_outputs": "qa_outputs"},
    "gpt2": {"lm_head": "lm_head", "score": "score", "qa_outputs": "qa_outputs"},
    "bert": {
        "mlm.dense": "cls.predictions.transform.dense",
        "mlm.norm": "cls.predictions.transform.LayerNorm",
        "mlm.bias": "cls.predictions.bias",
        "nsp": "cls.seq_relationship",
        "score": "classifier",
        "qa_outputs": "qa_outputs",
    },
}
_BODY_PREFIX = {"llama": "model.", "gpt2": "transformer.", "bert": "bert."}
# Llama's and Qwen2's *ForQuestionAnswering keep the body under `transformer.` (Mistral's under `model.`)
_SPAN_PREFIX = {"llama": "transformer.", "qwen2": "transformer."}
# HF keys that carry no weights of ours (buffers, tied copies)
_IGNORED = re.compile(r"(position_ids|rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias|"
                      r"cls\.predictions\.decoder\.(weight|bias))$")
_GPT2_CONV1D = re.compile(r"\.(attn\.(qkv|o)|mlp\.(up|down))\.weight$")  # our names of GPT-2's Conv1D weights
_ARCH = {
    ("llama", "lm"): "LlamaForCausalLM", ("llama", "classifier"): "LlamaForSequenceClassification",
    ("llama", "none"): "LlamaModel",
    ("mistral", "lm"): "MistralForCausalLM", ("mistral", "classifier"): "MistralForSequenceClassification",
    ("mistral", "none"): "MistralModel",
    ("qwen2", "lm"): "Qwen2ForCausalLM", ("qwen2", "classifier"): "Qwen2ForSequenceClassification",
    ("qwen2", "none"): "Qwen2Model",
    ("gpt2", "lm"): "GPT2LMHeadModel", ("gpt2", "classifier"): "GPT2ForSequenceClassification",
    ("gpt2", "none"): "GPT2Model",
    ("bert", "mlm"): "BertForMaskedLM", ("bert", "pretraining"): "BertForPreTraining",
    ("bert", "classifier"): "BertForSequenceClassification", ("bert", "none"): "BertModel",
    ("llama", "span"): "LlamaForQuestionAnswering", ("mistral", "span"): "MistralForQuestionAnswering",
    ("qwen2", "span"): "Qwen2ForQuestionAnswering", ("gpt2", "span"): "GPT2ForQuestionAnswering",
    ("bert", "span"): "BertForQuestionAnswering",
}


def _family_names(family: str) -> str:
    return "llama" if family in DECODERS else family


# ---- module names, for formats that address modules rather than whole checkpoints (PEFT adapters) ----

def body_prefix(family: str, head: str = "lm") -> str:
    """The prefix of the body's modules in a Hugging Face model with `head` (`model.`, `transformer.`, `bert.`);
    a bare body (head none) has none. PEFT adapters of a bare body and of a model with a head differ by it."""
    if head == "none":
        return ""
    if head == "span" and family in _SPAN_PREFIX:
        return _SPAN_PREFIX[family]
    return _BODY_PREFIX[_family_names(family)]


def hf_module_name(cfg: ModelConfig, ours: str) -> str | None:
    """The Hugging Face module name of our module `ours` in a model of `cfg` (blocks.0.attn.q ->
    model.layers.0.self_attn.q_proj), with the body prefix when the model has a head; None when it has none.
    PEFT names adapted layers and modules_to_save this way."""
    fam = _family_names(cfg.family)
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", ours)
    key = f"blocks.{{i}}.{m[2]}" if m else ours
    if key in _NAMES[fam]:
        name = body_prefix(cfg.family, cfg.head) + _NAMES[fam][key]
    elif key in _HEADS[fam]:
        name = _HEADS[fam][key]
    else:
        return None
    return name.replace("{i}", m[1]) if m else name


def stored_transposed(family: str, name: str) -> bool:
    """Whether our parameter `name` is stored transposed, (in, out), in the family's Hugging Face checkpoints
    (GPT-2's Conv1D layers), so a tensor saved under the HF name must be transposed."""
    return _family_names(family) == "gpt2" and _GPT2_CONV1D.search(name) is not None


def _head_from_arch(arch: str | None) -> str:
    if not arch:
        return "lm"
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "lm"
    if arch.endswith("ForSequenceClassification"):
        return "classifier"
    if arch.endswith("ForQuestionAnswering"):
        return "span"
    if arch.endswith("ForMaskedLM"):
        return "mlm"
    if arch.endswith("ForPreTraining"):
        return "pretraining"
    if arch.endswith("Model"):
        return "none"
    raise ValueError(f"architecture {arch!r} is not supported; expected a *ForCausalLM, *ForSequenceClassification, "
                     "*ForQuestionAnswering, *ForMaskedLM, *ForPreTraining or base *Model class")


_REQUIRED = object()


def _size(hf: dict[str, Any], key: str, where: str, default: Any = _REQUIRED) -> Any:
    """A positive-integer setting of config.json (`default` when absent or null); InputError naming the file and
    key when it is missing without a default, or not a positive integer."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise InputError(f"{where}: missing key {key!r}; expected a positive integer")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{where}: {key} is {value!r}, expected a positive integer")
    return value


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face config.json dict into a ModelConfig; InputError (naming `where` and the key) for
    what lmforge cannot build."""
    try:
        return _config_from_hf(hf, where)
    except ValueError as e:  # ModelConfig's own checks, e.g. hidden_size not divisible by num_heads
        if isinstance(e, InputError):
            raise
        raise InputError(f"{where}: {e}") from None


def _config_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
    def size(key: str, default: Any = _REQUIRED) -> Any:
        return _size(hf, key, where, default)

    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise InputError(f"{where}: model_type {mt!r} is not supported; expected one of {FAMILIES}")
    archs = hf.get("architectures") or [None]
    try:
        head = _head_from_arch(archs[0])
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    id2label = hf.get("id2label")
    num_labels = len(id2label) if id2label else hf.get("num_labels", 2)
    common = dict(family=mt, head=head, vocab_size=size("vocab_size"), pad_token_id=hf.get("pad_token_id"),
                  bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                  initializer_range=hf.get("initializer_range", 0.02), num_labels=num_labels,
                  id2label=id2label if head == "classifier" else None)
    if mt in DECODERS:
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "gelu", "relu"):
            raise InputError(f"{where}: hidden_act {act!r} is not supported; expected silu, gelu or relu")
        window = hf.get("sliding_window") if (mt == "mistral" or hf.get("use_sliding_window")) else None
        if mt == "qwen2" and window and hf.get("max_window_layers", 0) < size("num_hidden_layers"):
            raise InputError(f"{where}: qwen2 sliding window on only some layers (max_window_layers="
                             f"{hf.get('max_window_layers')}) is not supported")
        bias = bool(hf.get("attention_bias", mt == "qwen2"))
        return ModelConfig(
            **common, hidden_size=size("hidden_size"), num_layers=size("num_hidden_layers"),
            num_heads=size("num_attention_heads"), num_kv_heads=size("num_key_value_heads", None),
            head_dim=size("head_dim", None), intermediate_size=size("intermediate_size"),
            max_position_embeddings=size("max_position_embeddings", 2048), norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope", rope_theta=float(theta),
            rope_scaling=scaling, mlp="gated", activation=act, qkv_bias=bias,
            out_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # False: the class default of all three
            sliding_window=window)
    if mt == "gpt2":
        for opt in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(opt):
                raise InputError(f"{where}: gpt2 option {opt}=true is not supported")
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
        if hf.get("activation_function", "gelu_new") not in act:
            raise InputError(f"{where}: activation_function {hf['activation_function']!r} is not supported")
        c = size("n_embd")
        return ModelConfig(
            **common, hidden_size=c, num_layers=size("n_layer"), num_heads=size("n_head"),
            intermediate_size=size("n_inner", 4 * c), max_position_embeddings=size("n_positions"),
            norm="layernorm", norm_bias=True, norm_eps=hf.get("layer_norm_epsilon", 1e-5), position="learned",
            mlp="plain", activation=act[hf.get("activation_function", "gelu_new")], qkv_bias=True, out_bias=True,
            mlp_bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    # bert
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise InputError(f"{where}: position_embedding_type {hf['position_embedding_type']!r} is not supported")
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}.get(hf.get("hidden_act", "gelu"))
    if act is None:
        raise InputError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported; expected gelu, gelu_new or relu")
    return ModelConfig(
        **common, hidden_size=size("hidden_size"), num_layers=size("num_hidden_layers"),
        num_heads=size("num_attention_heads"), intermediate_size=size("intermediate_size"),
        max_position_embeddings=size("max_position_embeddings"), causal=False, norm="layernorm",
        norm_bias=True,
        norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post", position="learned", mlp="plain",
        activation=act, qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
        type_vocab_size=hf.get("type_vocab_size", 2), embed_norm=True, final_norm=False,
        pooler=head in ("none", "classifier", "pretraining"))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Translate a ModelConfig into a Hugging Face config.json dict."""
    fam = cfg.family
    if (fam, cfg.head) not in _ARCH:
        raise ValueError(f"cannot export family {fam!r} with head {cfg.head!r} to a Hugging Face architecture")
    out: dict[str, Any] = {"architectures": [_ARCH[(fam, cfg.head)]], "model_type": fam,
                           "vocab_size": cfg.vocab_size, "initializer_range": cfg.initializer_range,
                           "pad_token_id": cfg.pad_token_id, "bos_token_id": cfg.bos_token_id,
                           "eos_token_id": cfg.eos_token_id, "tie_word_embeddings": cfg.tie_embeddings}
    if cfg.head == "classifier":
        labels = cfg.id2label or {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
        out.update(id2label={str(k): v for k, v in labels.items()}, label2id={v: k for k, v in labels.items()},
                   num_labels=cfg.num_labels)
        if cfg.num_labels == 1:
            out["problem_type"] = "regression"
    if fam in DECODERS:
        rope_params = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
        out.update(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                   intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                   rms_norm_eps=cfg.norm_eps, hidden_act=cfg.activation, rope_theta=cfg.rope_theta,
                   rope_scaling=cfg.rope_scaling, rope_parameters=rope_params, mlp_bias=cfg.mlp_bias)
        if fam == "llama":
            if cfg.qkv_bias != cfg.out_bias:
                raise ValueError("llama export needs qkv_bias == out_bias (attention_bias); use family qwen2")
            out["attention_bias"] = cfg.qkv_bias
        elif fam == "qwen2":
            out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
        else:
            out["sliding_window"] = cfg.sliding_window
        return out
    if fam == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation]
        out.update(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                   n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings,
                   layer_norm_epsilon=cfg.norm_eps, activation_function=act)
        return out
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.activation]
    out.update(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
               intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
               layer_norm_eps=cfg.norm_eps, hidden_act=act, type_vocab_size=cfg.type_vocab_size,
               position_embedding_type="absolute")
    return out


def _rules(family: str, prefix: str) -> list[tuple[re.Pattern, str, re.Pattern, str]]:
    """(hf regex, our template, our regex, hf template) for each module name, the body's under `prefix`."""
    fam = _family_names(family)
    rules = []
    for table, pre in ((_NAMES[fam], prefix), (_HEADS[fam], "")):
        for ours, theirs in table.items():
            hf = pre + theirs
            hf_re = re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?P<rest>(\.[a-z_]+)?)$")
            our_re = re.compile("^" + re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?P<rest>(\.[a-z_]+)?)$")
            rules.append((hf_re, ours, our_re, hf))
    return rules


def _sub(template: str, m: re.Match) -> str:
    name = template.replace("{i}", m.group("i")) if "{i}" in template else template
    rest = m.group("rest")
    return name + {".gamma": ".weight", ".beta": ".bias"}.get(rest, rest)


def state_dict_from_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> tuple[dict[str, Tensor], list[str]]:
    """Rename HF weights to ours; returns (our state dict, HF keys that matched nothing)."""
    fam = _family_names(cfg.family)
    prefix = body_prefix(cfg.family, cfg.head if cfg.head != "none" else "lm")
    rules = _rules(cfg.family, prefix if any(k.startswith(prefix) for k in sd) else "")
    out: dict[str, Tensor] = {}
    unmatched = []
    for key, value in sd.items():
        if _IGNORED.search(key):
            continue
        for hf_re, ours, _, _ in rules:
            m = hf_re.match(key)
            if m:
                name = _sub(ours, m)
                break
        else:
            unmatched.append(key)
            continue
        if fam == "gpt2" and _GPT2_CONV1D.search(name):
            value = value.t()  # Conv1D stores (in, out)
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
            q, k, v = value.split([cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                                   cfg.num_kv_heads * cfg.head_dim], dim=0)
            base, kind = name.rsplit(".", 1)
            base = base[: -len("qkv")]
            out.update({f"{base}q.{kind}": q, f"{base}k.{kind}": k, f"{base}v.{kind}": v})
            continue
        out[name] = value.contiguous()
    return out, unmatched


def state_dict_to_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename our weights to the HF names of the exported architecture."""
    fam = _family_names(cfg.family)
    rules = _rules(cfg.family, body_prefix(cfg.family, cfg.head))
    out: dict[str, Tensor] = {}
    if fam == "gpt2":  # fuse q, k, v into c_attn
        sd = dict(sd)
        for i in range(cfg.num_layers):
            for kind in ("weight", "bias"):
                parts = [sd.pop(f"blocks.{i}.attn.{n}.{kind}") for n in "qkv"]
                sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, 0)
    for name, value in sd.items():
        for _, _, our_re, hf in rules:
            m = our_re.match(name)
            if m:
                key = _sub(hf, m)
                break
        else:
            raise KeyError(f"no Hugging Face name for parameter {name!r} of family {cfg.family}")
        if fam == "gpt2" and _GPT2_CONV1D.search(name):
            value = value.t()
        out[key] = value.contiguous()
    return out


def read_config(path) -> dict[str, Any]:
    """config.json (or another JSON object file of a model folder) as a dict; InputError naming the file."""
    return read_json_object(path, "an object of model settings")
