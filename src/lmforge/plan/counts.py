"""Exact parameter counts from a `ModelConfig` alone (no weights, not even on the meta device), and the trainable
count under LoRA / QLoRA with the same layer names `transforms.lora` matches its `targets` against.

`parameter_shapes(cfg)` lists every parameter `Transformer(cfg).named_parameters()` yields, with its shape; the
counts are sums over it, so a test can compare the two name by name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from ..models.transformer import TASK_HEADS, ModelConfig

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "ParameterCount",
    "TrainableCount",
    "count_parameters",
    "linear_layers",
    "match_targets",
    "matmul_parameters",
    "nf4_bytes",
    "parameter_shapes",
    "trainable_parameters",
]

DEFAULT_LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
"""`LoraConfig.targets`' default: every linear layer of the blocks."""

NF4_CODE_BYTES = 16 * 4
"""bitsandbytes' NF4 code book: 16 float32 levels."""
NESTED_BLOCK = 256
"""Double quantization: absmax values share one float32 scale per 256 blocks (bitsandbytes' nested blocksize)."""
NESTED_CODE_BYTES = 256 * 4
"""Double quantization: the 8-bit dynamic code book of the absmax values, 256 float32 levels."""


def _norm_shapes(cfg: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    """RMSNorm has a weight; LayerNorm a weight and (with norm_bias) a bias, each (C,)."""
    out = {f"{prefix}.weight": (cfg.hidden_size,)}
    if cfg.norm == "layernorm" and cfg.norm_bias:
        out[f"{prefix}.bias"] = (cfg.hidden_size,)
    return out


def linear_layers(cfg: ModelConfig) -> dict[str, tuple[int, int, bool]]:
    """Every nn.Linear of `Transformer(cfg)` by module name: (in_features, out_features, has_bias), in the order
    `named_modules()` visits them."""
    c, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d  # query width H·D, key/value width K·D
    out: dict[str, tuple[int, int, bool]] = {}
    for i in range(cfg.num_layers):
        a, m = f"blocks.{i}.attn", f"blocks.{i}.mlp"
        out.update({f"{a}.q": (c, q, cfg.qkv_bias), f"{a}.k": (c, kv, cfg.qkv_bias), f"{a}.v": (c, kv, cfg.qkv_bias),
                    f"{a}.o": (q, c, cfg.out_bias)})
        if cfg.mlp == "gated":
            out[f"{m}.gate"] = (c, f, cfg.mlp_bias)
        out.update({f"{m}.up": (c, f, cfg.mlp_bias), f"{m}.down": (f, c, cfg.mlp_bias)})
    if cfg.head == "lm" and not cfg.tie_embeddings:
        out["lm_head"] = (c, cfg.vocab_size, False)
    if cfg.head in ("mlm", "pretraining"):
        out["mlm.dense"] = (c, c, True)
    if cfg.pooler or cfg.head == "pretraining":
        out["pooler"] = (c, c, True)
    if cfg.head == "pretraining":
        out["nsp"] = (c, 2, True)
    if cfg.head == "classifier":
        out["score"] = (c, cfg.num_labels, cfg.pooler)
    if cfg.head == "span":
        out["qa_outputs"] = (c, 2, True)
    return out


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter of `Transformer(cfg)` (a tied output head shares the token embedding, so it
    is not listed twice; BERT's masked-LM decoder is that embedding plus `mlm.bias`)."""
    c = cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {"embed.tokens.weight": (cfg.vocab_size, c)}
    if cfg.position == "learned":
        out["embed.positions.weight"] = (cfg.max_position_embeddings, c)
    if cfg.type_vocab_size:
        out["embed.token_types.weight"] = (cfg.type_vocab_size, c)
    if cfg.embed_norm:
        out.update(_norm_shapes(cfg, "embed.norm"))
    linears = linear_layers(cfg)

    def linear(name: str) -> None:
        i, o, bias = linears[name]
        out[f"{name}.weight"] = (o, i)  # (out, in)
        if bias:
            out[f"{name}.bias"] = (o,)

    for i in range(cfg.num_layers):
        out.update(_norm_shapes(cfg, f"blocks.{i}.attn_norm"))
        for n in ("q", "k", "v", "o"):
            linear(f"blocks.{i}.attn.{n}")
        out.update(_norm_shapes(cfg, f"blocks.{i}.mlp_norm"))
        for n in ("gate", "up", "down") if cfg.mlp == "gated" else ("up", "down"):
            linear(f"blocks.{i}.mlp.{n}")
    if cfg.final_norm:
        out.update(_norm_shapes(cfg, "norm"))
    for name in ("lm_head", "mlm.dense"):
        if name in linears:
            linear(name)
    if cfg.head in ("mlm", "pretraining"):
        out.update(_norm_shapes(cfg, "mlm.norm"))
        out["mlm.bias"] = (cfg.vocab_size,)
    for name in ("pooler", "nsp", "score"):
        if name in linears:
            linear(name)
    return out


@dataclass
class ParameterCount:
    """Parameters of a model by part; `total` equals `sum(p.numel() for p in Transformer(cfg).parameters())`."""

    embedding: int
    """Token embedding V·C (also the output head when tied)."""
    positions: int
    """Learned position table and token-type (segment) embeddings, with the embedding norm."""
    attention: int
    """q, k, v, o weights and biases of every block (GQA: k and v have K·D outputs)."""
    mlp: int
    """gate (gated MLP), up and down weights and biases of every block."""
    norms: int
    """Normalisation weights (and LayerNorm biases) of the blocks and the final norm."""
    head: int
    """Output parameters beyond the embedding: untied lm_head, masked-LM head, pooler, NSP, classifier."""
    total: int
    """All of the above."""
    non_embedding: int
    """total minus the token embedding and positions (Kaplan et al. 2020's N); an untied lm_head stays in."""
    tied: bool
    """Whether the LM head is the token embedding."""

    def to_dict(self) -> dict[str, int | bool]:
        return asdict(self)


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Exact parameter count of `Transformer(cfg)` by part, from the config alone."""
    parts = {"embedding": 0, "positions": 0, "attention": 0, "mlp": 0, "norms": 0, "head": 0}
    for name, shape in parameter_shapes(cfg).items():
        n = math.prod(shape)
        if name == "embed.tokens.weight":
            parts["embedding"] += n
        elif name.startswith("embed."):
            parts["positions"] += n
        elif ".attn." in name:
            parts["attention"] += n
        elif ".mlp." in name:
            parts["mlp"] += n
        elif name.startswith(("blocks.", "norm.")):
            parts["norms"] += n
        else:
            parts["head"] += n
    total = sum(parts.values())
    return ParameterCount(**parts, total=total, non_embedding=total - parts["embedding"] - parts["positions"],
                          tied=cfg.head == "lm" and cfg.tie_embeddings)


def matmul_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(per-token, per-sequence) weights of the matrix multiplies a training forward runs: per token, every block
    linear and the output projection (V·C: the lm_head, or the token embedding when tied or under a masked-LM
    decoder, plus the MLM head's dense C·C); per sequence, the pooler / NSP / classifier applied to one token.
    Embedding lookups, norms and biases are not matmuls."""
    linears = linear_layers(cfg)
    per_token = sum(i * o for n, (i, o, _) in linears.items() if n.startswith("blocks."))
    if cfg.head == "lm":
        per_token += cfg.vocab_size * cfg.hidden_size
    elif cfg.head in ("mlm", "pretraining"):
        per_token += cfg.vocab_size * cfg.hidden_size + cfg.hidden_size ** 2
    heads = ("pooler", "nsp", "score") if cfg.head in ("pretraining", "classifier") else ()  # 'none' skips its pooler
    per_sequence = sum(i * o for n, (i, o, _) in linears.items() if n in heads)
    return per_token, per_sequence


def match_targets(cfg: ModelConfig, targets: list[str] | tuple[str, ...]) -> list[str]:
    """Linear layers LoRA adapts in a model of `cfg`, by `transforms.lora`'s own rule (`lora.match_targets`)."""
    from ..transforms.lora import match_targets as lora_targets

    return lora_targets(list(linear_layers(cfg)), targets)


def nf4_bytes(numel: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes of one NF4-quantized weight of `numel` values (QLoRA, Dettmers et al. 2023, §3): two 4-bit codes per
    byte, one absmax per block (float32, or uint8 with double quantization plus a float32 per 256 blocks and the
    8-bit code book), and the 16-level code book — what `NF4Linear.nbytes()` counts."""
    blocks = math.ceil(numel / block_size)
    size = math.ceil(numel / 2) + NF4_CODE_BYTES
    if double_quant:
        return size + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + NESTED_CODE_BYTES
    return size + 4 * blocks


@dataclass
class TrainableCount:
    """What a training method trains and what it stores frozen."""

    method: str
    """full, lora or qlora."""
    trainable: int
    """Parameters with requires_grad (what gets gradients and optimizer state)."""
    frozen: int
    """Parameters kept fixed (float tensors; NF4 weights are counted in nf4_weights instead)."""
    adapters: int
    """LoRA A and B weights: r·(in + out) per adapted layer."""
    adapted_layers: list[str] = field(default_factory=list)
    """Names of the linear layers carrying an adapter."""
    nf4_weights: int = 0
    """QLoRA: weights stored as NF4 codes (every block linear's weight)."""
    nf4_bytes: int = 0
    """QLoRA: bytes of those NF4 weights (codes, block scales, code books)."""

    def to_dict(self) -> dict:
        return asdict(self)


def trainable_parameters(cfg: ModelConfig, method: Literal["full", "lora", "qlora"] = "full", rank: int = 8,
                         targets: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS,
                         modules_to_save: list[str] | None = None, block_size: int = 64,
                         double_quant: bool = True) -> TrainableCount:
    """Trainable and frozen parameters under `method`, as `transforms.lora.apply_lora` leaves the model: adapters
    (and `modules_to_save`, default the classifier's `score`) train, everything else is frozen; QLoRA stores the
    weight of every linear of the blocks in NF4 (biases stay float)."""
    shapes = parameter_shapes(cfg)
    total = sum(math.prod(s) for s in shapes.values())
    if method == "full":
        return TrainableCount(method, total, 0, 0)
    if method not in ("lora", "qlora"):
        raise ValueError(f"method: expected full, lora or qlora, found {method!r}")
    if rank < 1:
        raise ValueError(f"rank: expected an integer >= 1, found {rank}")
    linears = linear_layers(cfg)
    chosen = match_targets(cfg, targets)
    adapters = sum(rank * (linears[n][0] + linears[n][1]) for n in chosen)  # A (r, in) + B (out, r)
    keep = modules_to_save if modules_to_save is not None else \
        ([TASK_HEADS[cfg.head]] if cfg.head in TASK_HEADS else [])
    saved = sum(math.prod(s) for n, s in shapes.items() if any(n.startswith(m + ".") for m in keep))
    nf4_w = nf4_b = 0
    if method == "qlora":
        for n, (i, o, _) in linears.items():
            if n.startswith("blocks."):
                nf4_w += i * o
                nf4_b += nf4_bytes(i * o, block_size, double_quant)
    return TrainableCount(method, adapters + saved, total - saved - nf4_w, adapters, chosen, nf4_w, nf4_b)
