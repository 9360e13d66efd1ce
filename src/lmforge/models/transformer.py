"""One Transformer for decoder-only (Llama / Mistral / Qwen2 / SmolLM, GPT-2) and encoder (BERT) models.

Every architecture difference is a field of `ModelConfig`; there is one `Transformer` class. Shapes use
B = batch, T = new tokens in this call, S = total key length (past + new), H = query heads, K = key/value
heads, D = head dim, C = hidden size, V = vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from ..precision import checkpoint_contexts
from .cross_entropy import distributed, linear_cross_entropy


@dataclass
class ModelConfig:
    """Architecture of a `Transformer`; every family is a combination of these fields."""

    vocab_size: int = 32000
    """Number of token embeddings."""
    hidden_size: int = 512
    """Width of the residual stream (C)."""
    num_layers: int = 8
    """Number of transformer blocks."""
    num_heads: int = 8
    """Query heads (H)."""
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (K); None means num_heads."""
    head_dim: int | None = None
    """Per-head width (D); None means hidden_size // num_heads."""
    intermediate_size: int = 1408
    """Hidden width of the MLP."""
    max_position_embeddings: int = 2048
    """Longest sequence (size of learned position table; context length for RoPE models)."""
    causal: bool = True
    """Causal (decoder) or bidirectional (encoder) attention."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    norm_position: Literal["pre", "post"] = "pre"
    """Pre-norm (Llama, GPT-2) or post-norm (BERT) residual blocks."""
    position: Literal["rope", "learned"] = "rope"
    """Rotary embeddings or a learned absolute position table."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """RoPE scaling as in Hugging Face configs ({"rope_type": "linear"|"llama3", ...}); None for plain RoPE."""
    mlp: Literal["gated", "plain"] = "gated"
    """Gated MLP (SwiGLU: down(act(gate(x)) * up(x))) or plain (down(act(up(x))))."""
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    """MLP nonlinearity."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2, GPT-2, BERT)."""
    out_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Bias on the MLP projections."""
    norm_bias: bool = False
    """LayerNorm has a bias (ignored by RMSNorm)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    type_vocab_size: int = 0
    """Token-type (segment) embeddings, as in BERT; 0 disables them."""
    embed_norm: bool = False
    """Normalise the embeddings before the first block (BERT)."""
    final_norm: bool = True
    """Normalise the output of the last block (pre-norm models)."""
    sliding_window: int | None = None
    """Attend only to the last N keys (Mistral); None for full attention."""
    head: Literal["lm", "mlm", "pretraining", "classifier", "span", "none"] = "lm"
    """Output head: next-token LM, masked LM, masked LM + next-sentence (BERT pretraining), classifier/scalar,
    span (extractive QA: start and end logits per token), none."""
    num_labels: int = 2
    """Outputs of the classifier head; 1 makes it a scalar (reward, value or regression) head."""
    pooler: bool = False
    """BERT pooler (dense + tanh on the first token) feeding the classifier / next-sentence head."""
    pad_token_id: int | None = None
    """Padding token; the decoder classifier pools the last non-pad token."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence token(s)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal initialisation."""
    family: str = "llama"
    """Hugging Face model_type this config exports to (llama, mistral, qwen2, gpt2, bert)."""
    id2label: dict[int, str] | None = None
    """Names of the classifier outputs, saved with the model."""

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def num_parameters(self) -> int:
        """Exact parameter count without allocating weights (the model is built on the meta device)."""
        with torch.device("meta"):
            return Transformer(self).num_parameters()


TASK_HEADS = {"classifier": "score", "span": "qa_outputs"}
"""The module each task head adds on a pretrained body: new weights that train with every method (LoRA saves them,
as PEFT's modules_to_save)."""


@dataclass
class ModelOutput:
    """What `Transformer.forward` returns."""

    logits: Tensor | None = None
    """LM logits (B, T, V), classifier logits (B, num_labels), span logits (B, T, 2) ([..., 0] start, [..., 1] end),
    or None for head='none'."""
    hidden: Tensor | None = None
    """Final hidden states (B, T, C)."""
    nsp_logits: Tensor | None = None
    """Next-sentence logits (B, 2) for head='pretraining'."""
    extra: dict[str, Tensor] = field(default_factory=dict)


class KVCache(Protocol):
    """What attention needs from a cache. The contiguous `DenseKVCache` implements it; the inference
    engine's `PagedKVCache` implements the same two members (its length() is 0: the engine passes positions,
    and the cache masks each sequence by its own block table, ignoring `mask`)."""

    def length(self) -> int:
        """Tokens already stored (the position offset of the next call)."""
        ...

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Store k, v (B, K, T, D) for `layer`, attend q (B, H, T, D) over all stored keys; return (B, H, T, D)."""
        ...


class DenseKVCache:
    """A preallocated contiguous cache: (B, K, max_len, D) per layer."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.pos = 0
        self.max_len = max_len
        self.gqa = cfg.num_heads != cfg.num_kv_heads

    def length(self) -> int:
        return self.pos

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        if layer == len(self.k) - 1:
            self.pos = end
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, K, S, D)
        if mask is None and t > 1:  # plain causal prefill starting at 0
            return F.scaled_dot_product_attention(q, keys, values, is_causal=end == t, enable_gqa=self.gqa)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.gqa)


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)


_ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rope_frequencies(cfg: ModelConfig, device=None) -> Tensor:
    """Inverse frequencies (D/2,) of rotary embeddings, with linear or Llama-3 scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (expected default, linear or llama3)")


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate halves of x (B, H, T, D) by cos/sin (B, 1, T, D) — the Hugging Face (non-interleaved) layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
    """softmax(QKᵀ/√D + M)V with two matmuls, in the inputs' dtype (bf16 on CPU; softmax accumulates in fp32
    internally, and the bf16 matmul output holds no more precision than that). On CPU this is faster than the
    flash kernel for sequences up to ~1k, forward + backward."""
    h, kv = q.shape[1], k.shape[1]
    if h != kv:
        k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)  # (B, H, S, D)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, T, S)
    if mask is None and is_causal:
        t, s = scores.shape[-2:]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v  # (B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        c, d = cfg.hidden_size, cfg.head_dim
        self.q = nn.Linear(c, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k = nn.Linear(c, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v = nn.Linear(c, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.num_heads * d, c, bias=cfg.out_bias)

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Query, key and value projections of x (B, T, C) (the inference engine may run them as one matmul)."""
        return self.q(x), self.k(x), self.v(x)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: KVCache | None, is_causal: bool) -> Tensor:
        b, t, _ = x.shape
        cfg = self.cfg
        q, k, v = self.project_qkv(x)  # (B, T, H*D), (B, T, K*D), (B, T, K*D)
        # heads from the projections' widths: under tensor parallelism a process holds H / tp and K / tp of them
        q = q.view(b, t, -1, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(b, t, -1, cfg.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(b, t, -1, cfg.head_dim).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            y = cache.attend(self.layer, q, k, v, mask)
        elif q.device.type == "cpu" and q.dtype == torch.bfloat16 and t <= 1024:
            y = matmul_attention(q, k, v, mask, is_causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                               enable_gqa=cfg.num_kv_heads != cfg.num_heads)
        y = y.transpose(1, 2).reshape(b, t, -1)  # (B, T, H*D)
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, f = cfg.hidden_size, cfg.intermediate_size
        if cfg.mlp == "gated":
            self.gate = nn.Linear(c, f, bias=cfg.mlp_bias)
        self.up = nn.Linear(c, f, bias=cfg.mlp_bias)
        self.down = nn.Linear(f, c, bias=cfg.mlp_bias)
        self.act = _ACT[cfg.activation]
        self.gated = cfg.mlp == "gated"

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))  # (B, T, F)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.attn_norm = _norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = _norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope, mask, cache, is_causal: bool) -> Tensor:
        if self.pre:
            x = x + self.attn(self.attn_norm(x), rope, mask, cache, is_causal)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, rope, mask, cache, is_causal))
        return self.mlp_norm(x + self.mlp(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.position == "learned":
            self.positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        if cfg.type_vocab_size:
            self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        if cfg.embed_norm:
            self.norm = _norm(cfg)

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor | None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        x = self.tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        if hasattr(self, "positions"):
            x = x + self.positions(position_ids)
        if hasattr(self, "token_types"):
            tt = token_type_ids if token_type_ids is not None else torch.zeros_like(position_ids)
            x = x + self.token_types(tt)
        if hasattr(self, "norm"):
            x = self.norm(x)
        return x


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense -> act -> norm -> decoder (tied to the token embedding) + bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = _ACT[cfg.activation]
        self.norm = _norm(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, h: Tensor, embedding: Tensor) -> Tensor:
        return F.linear(self.norm(self.act(self.dense(h))), embedding, self.bias)  # (B, T, V)


class Transformer(nn.Module):
    """Decoder or encoder transformer with an LM, masked-LM, pretraining, classifier, span or no head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = False
        """Recompute each block's activations in backward instead of storing them (memory for compute)."""
        self.embed = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        if cfg.final_norm:
            self.norm = _norm(cfg)
        if cfg.head == "lm" and not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.head in ("mlm", "pretraining"):
            self.mlm = MLMHead(cfg)
        if cfg.pooler or cfg.head == "pretraining":
            self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        if cfg.head == "pretraining":
            self.nsp = nn.Linear(cfg.hidden_size, 2)
        if cfg.head == "classifier":
            self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=cfg.pooler)
        if cfg.head == "span":
            self.qa_outputs = nn.Linear(cfg.hidden_size, 2)
        if cfg.position == "rope":
            self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.apply(self.init_weights)

    def init_weights(self, m: nn.Module) -> None:
        """The initialisation of one module (normal(0, initializer_range) weights, zero biases), as transformers."""
        std = self.cfg.initializer_range
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

    def reset_rope(self) -> None:
        """Recompute the non-persistent RoPE buffer (after loading on the meta device or changing rope fields)."""
        if self.cfg.position == "rope":
            self.inv_freq = rope_frequencies(self.cfg, device=self.embed.tokens.weight.device)

    @property
    def device(self) -> torch.device:
        return self.embed.tokens.weight.device

    def _mask(self, attention_mask: Tensor | None, t: int, past: int, dtype: torch.dtype) -> Tensor | None:
        """Boolean mask (B or 1, 1, T, S): True where a query may attend a key; None for plain causal/full."""
        cfg = self.cfg
        s = past + t
        if attention_mask is None and cfg.sliding_window is None and (past == 0 or not cfg.causal or t == 1):
            return None
        device = self.device
        allowed = torch.ones(1, 1, t, s, dtype=torch.bool, device=device)
        if cfg.causal:
            qpos = torch.arange(past, s, device=device)[:, None]  # (T, 1)
            kpos = torch.arange(s, device=device)[None, :]  # (1, S)
            allowed = allowed & (kpos <= qpos)
            if cfg.sliding_window is not None:
                allowed = allowed & (qpos - kpos < cfg.sliding_window)
        if attention_mask is not None:
            if attention_mask.shape[-1] != s:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} tokens, expected {s} (past + new)")
            if attention_mask.dim() == 3:  # (B, T, S) pairs, e.g. packed examples that must not see each other
                allowed = allowed & attention_mask[:, None].bool()  # (B, 1, T, S)
            else:
                allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
            # a fully masked row (a left-pad query) would give NaN; let it attend everywhere (its output is unused)
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed

    def forward(self, input_ids: Tensor | None = None, *, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, token_type_ids: Tensor | None = None,
                cache: KVCache | None = None, inputs_embeds: Tensor | None = None,
                logits_to_keep: int | Tensor = 0, labels: Tensor | None = None) -> ModelOutput:
        """input_ids (B, T); attention_mask (B, S) with 1 for real tokens over past + new, or (B, T, S) booleans
        saying which key each query may see (packed sequences); position_ids (B, T).

        `logits_to_keep=N` computes LM logits only for the last N positions (generation), a tensor of positions
        only for those. With `labels` (B, T)
        an LM head returns the summed cross-entropy in `extra["loss_sum"]` (and the count of labelled tokens in
        `extra["loss_tokens"]`) without materialising the logits. A `prompt` module (prompt tuning) prepends its
        virtual tokens to every sequence; outputs cover the real tokens only."""
        cfg = self.cfg
        b, t = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        past = cache.length() if cache is not None else 0
        head_mask, head_ids, virtual = attention_mask, input_ids, 0
        if getattr(self, "prompt", None) is not None:
            inputs_embeds, attention_mask, position_ids, token_type_ids, virtual = self.prompt.prepend(
                self.embed.tokens, input_ids, inputs_embeds, attention_mask, position_ids, token_type_ids, past)
            input_ids, t = None, t + virtual
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2 and cfg.causal:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
            else:
                position_ids = torch.arange(past, past + t, device=self.device).expand(b, t)
        x = self.embed(input_ids, position_ids, token_type_ids, inputs_embeds)  # (B, T, C)
        rope = None
        if cfg.position == "rope":
            ang = position_ids[:, None, :, None].float() * self.inv_freq  # (B, 1, T, D/2)
            ang = torch.cat((ang, ang), dim=-1)  # (B, 1, T, D)
            rope = (ang.cos().to(x.dtype), ang.sin().to(x.dtype))
        mask = self._mask(attention_mask, t, past, x.dtype)
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, cache, cfg.causal, use_reentrant=False,
                                                      context_fn=checkpoint_contexts)
            else:
                x = block(x, rope, mask, cache, cfg.causal)
        if cfg.final_norm:
            x = self.norm(x)
        x = x[:, virtual:]  # (B, T, C) of the real tokens
        if labels is not None and cfg.head == "lm":
            w = self.embed.tokens.weight if cfg.tie_embeddings else self.lm_head.weight
            loss = linear_cross_entropy(x.reshape(-1, x.shape[-1]), w, labels.reshape(-1))
            return ModelOutput(hidden=x, extra={"loss_sum": loss, "loss_tokens": (labels != -100).sum()})
        return self.head(x, head_mask, head_ids, logits_to_keep)

    def head(self, h: Tensor, attention_mask: Tensor | None, input_ids: Tensor | None,
             logits_to_keep: int | Tensor = 0) -> ModelOutput:
        """Apply the configured head to final hidden states h (B, T, C)."""
        cfg = self.cfg
        out = ModelOutput(hidden=h)
        if cfg.head == "lm":
            if isinstance(logits_to_keep, Tensor):
                hk = h[:, logits_to_keep]  # (B, len(positions), C)
            else:
                hk = h[:, -logits_to_keep:] if logits_to_keep else h
            out.logits = self.project(hk)  # (B, T, V)
        elif cfg.head in ("mlm", "pretraining"):
            out.logits = self.mlm(h, self.embed.tokens.weight)
            if cfg.head == "pretraining":
                out.nsp_logits = self.nsp(torch.tanh(self.pooler(h[:, 0])))  # (B, 2)
        elif cfg.head == "classifier":
            out.logits = self.score(self.pool(h, attention_mask, input_ids))  # (B, num_labels)
        elif cfg.head == "span":
            out.logits = self.qa_outputs(h)  # (B, T, 2): start, end
        return out

    def project(self, h: Tensor) -> Tensor:
        """LM logits (..., V) of hidden states h (..., C): the output embedding (tied or lm_head); gathered from the
        processes when tensor parallelism splits it by vocabulary rows."""
        w = self.embed.tokens.weight if self.cfg.tie_embeddings else self.lm_head.weight
        if not distributed():
            return F.linear(h, w)
        from torch.distributed.tensor import DTensor, Replicate

        if not isinstance(w, DTensor):
            return F.linear(h, w)
        h = DTensor.from_local(h, w.device_mesh, [Replicate()])  # h's gradient is then summed over the processes
        return F.linear(h, w).full_tensor()  # (..., V) from each process's (..., V / P)

    def pool(self, h: Tensor, attention_mask: Tensor | None, input_ids: Tensor | None) -> Tensor:
        """Sequence summary (B, C): pooled first token for encoders, last real token for decoders."""
        if self.cfg.pooler:
            return torch.tanh(self.pooler(h[:, 0]))
        if not self.cfg.causal:
            return h[:, 0]
        b, t = h.shape[:2]
        if attention_mask is not None:
            # index of the last real token; works for right padding (left padding ends at t - 1)
            last = torch.where(attention_mask.bool()[:, -t:], torch.arange(t, device=h.device), -1).max(-1).values
        elif input_ids is not None and self.cfg.pad_token_id is not None:
            nonpad = input_ids != self.cfg.pad_token_id
            last = torch.where(nonpad, torch.arange(t, device=h.device), -1).max(-1).values
        else:
            last = torch.full((b,), t - 1, device=h.device)
        return h[torch.arange(b, device=h.device), last.clamp(min=0)]

    def score_tokens(self, h: Tensor) -> Tensor:
        """Per-token scores (B, T, num_labels) of the classifier head, e.g. a PPO value head."""
        return self.score(h)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
