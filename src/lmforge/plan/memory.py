"""Memory per device: training (weights, gradients, optimizer states, autocast copies, DDP buckets, FSDP2 gathers,
activations with and without checkpointing, the chunked logits of the fused cross-entropy) and inference (weights
and the KV cache), from a `ModelConfig` alone, as lmforge's trainer actually keeps things:

- parameters stay float32 under bf16 / fp16 autocast (`TrainConfig.precision`), so they are the master copy; the
  low-precision copy of each weight that a matmul saves for backward is `autocast_copies`;
- AdamW keeps two float32 states per trainable parameter (exp_avg, exp_avg_sq);
- LoRA / QLoRA (`transforms.methods.build_model`) keep frozen weights in the autocast dtype, adapters in float32,
  and QLoRA's block linears in NF4;
- the LM loss is `models.cross_entropy.linear_cross_entropy`: logits exist one chunk of tokens at a time (256 tokens
  on CPU, 4096 on accelerators) and the gradients of the head and of the hidden states are computed in the forward
  and held until backward.

Parallelism (`engine.distributed`): DDP keeps a second fp32 gradient copy in its buckets; ZeRO-1 shards the
optimizer states over the P / tp data-parallel processes (gradients are all-reduced whole, then only the owned ones
are kept for the step); ZeRO-2 also shards the gradients (each is reduced to its owner as backward makes it, so one
other-owned gradient at most is alive); FSDP2 (ZeRO-3) also shards the weights. Tensor parallelism (tp) splits each
block's q/k/v/gate/up by output and o/down by input columns, and with them the heads and MLP width of the
activations; embeddings, norms and the head stay whole on every process.

Activations are the tensors autograd saves for backward, counted per token from what each op of our blocks saves
(checked against `saved_tensors_hooks` in tests/unit/test_plan.py): with activation checkpointing a block keeps only
its input, and one block is recomputed at a time. Sizes are bytes; B = micro batch, T = sequence length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from ..errors import InputError
from ..models.transformer import TASK_HEADS, ModelConfig
from .counts import (
    DEFAULT_LORA_TARGETS,
    linear_layers,
    nf4_bytes,
    parameter_shapes,
    trainable_parameters,
)

__all__ = [
    "DTYPE_BYTES",
    "InferenceMemory",
    "TrainMemory",
    "TrainSetup",
    "activation_bytes",
    "attention_kernel",
    "inference_memory",
    "loss_chunk",
    "training_memory",
    "vocab_split",
]

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1}
"""Bytes per element of the dtypes a plan names."""
MATMUL_ATTENTION_MAX_T = 1024
"""`Attention.forward` runs `matmul_attention` (O(T²) saved probabilities) for bf16 queries on CPU up to this T."""
FSDP_PREFETCH_BLOCKS = 2
"""Blocks whose parameters FSDP2 holds unsharded at once (the one computing and the one prefetched)."""


@dataclass
class TrainSetup:
    """How a model is trained: batch, precision, method and parallelism (the memory plan's inputs)."""

    micro_batch: int = 8
    """B: sequences per micro batch on each device."""
    seq_len: int = 1024
    """T: tokens per sequence."""
    parallel: Literal["single", "ddp", "zero1", "zero2", "fsdp"] = "single"
    """One process, DDP (replicated), ZeRO-1 (optimizer states sharded), ZeRO-2 (and gradients) or FSDP2 (ZeRO-3:
    and parameters), over the P / tp data-parallel processes."""
    devices: int = 1
    """P: processes (devices) taking part."""
    tp: int = 1
    """Tensor-parallel degree: block linears, heads and MLP width split over tp processes."""
    sequence_parallel: bool = False
    """With tp > 1: norms and the residual stream split by position over the tp processes."""
    method: Literal["full", "lora", "qlora"] = "full"
    """Train every parameter, LoRA adapters on a frozen base, or QLoRA (adapters on an NF4 base)."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Autocast dtype of forward/backward (parameters stay fp32), as TrainConfig.precision."""
    activation_checkpointing: bool = False
    """Recompute each block in backward, keeping only block inputs."""
    optimizer_states: int = 2
    """float32 states per trainable parameter: 2 for AdamW / Adam / LAMB, 1 for momentum, 0 for SGD."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Linear layers with adapters (names as transforms.lora matches them)."""
    quant_block_size: int = 64
    """QLoRA: weights per NF4 block."""
    double_quant: bool = True
    """QLoRA: 8-bit quantized block scales."""
    device: Literal["cpu", "cuda"] = "cuda"
    """Device kind: sets the loss chunk (256 tokens on CPU, 4096 on accelerators) and the CPU attention path."""

    def validate(self) -> None:
        """ValueError naming the field that is out of range."""
        for name in ("micro_batch", "seq_len", "devices", "tp", "lora_rank", "quant_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, found {getattr(self, name)}")
        if self.parallel not in ("single", "ddp", "zero1", "zero2", "fsdp"):
            raise ValueError(f"parallel: expected single, ddp, zero1, zero2 or fsdp, found {self.parallel!r}")
        if self.parallel == "single" and self.devices != 1:
            raise ValueError(f"devices: a single process uses 1 device, found {self.devices}; set parallel "
                             "ddp|zero1|zero2|fsdp")
        if self.devices % self.tp:
            raise ValueError(f"tp: {self.tp} does not divide devices {self.devices}")
        if self.tp > 1 and (self.parallel in ("single", "zero1", "zero2")
                            or (self.parallel == "ddp" and self.devices != self.tp)):
            raise ValueError(f"tp {self.tp}: tensor parallelism runs alone (parallel ddp, devices = tp) or with fsdp "
                             f"on the data dimension, found parallel {self.parallel} on {self.devices} devices")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel: splits positions over tensor-parallel processes; set tp > 1")
        if self.tp > 1 and self.method != "full":
            raise ValueError(f"tp {self.tp}: tensor parallelism splits plain linears; method {self.method} wraps them")
        if self.method not in ("full", "lora", "qlora"):
            raise ValueError(f"method: expected full, lora or qlora, found {self.method!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision: expected fp32, bf16 or fp16, found {self.precision!r}")
        if self.optimizer_states < 0:
            raise ValueError(f"optimizer_states: expected 0, 1 or 2, found {self.optimizer_states}")


@dataclass
class TrainMemory:
    """Training memory of one device, in bytes, by what holds it."""

    weights: int
    """Parameters as stored on this device: fp32 trainable, frozen in the autocast dtype, NF4 codes (÷P FSDP)."""
    gradients: int
    """float32 gradients of the trainable parameters alive at the end of backward (÷P under FSDP; ZeRO-2: the
    owned ones plus the largest other-owned one on its way to its owner)."""
    step_gradients: int
    """float32 gradients alive during the optimizer step (ZeRO-1: only the owned share; otherwise `gradients`)."""
    optimizer: int
    """Optimizer states: states × 4 bytes × trainable parameters (÷P under FSDP, ZeRO-1 and ZeRO-2)."""
    master_weights: int
    """Separate fp32 master copies: 0, lmforge's parameters are themselves fp32 (autocast computes in bf16)."""
    autocast_copies: int
    """bf16/fp16 casts of fp32 matmul weights (adapters under LoRA) saved for backward (0 with checkpointing:
    then one block's casts are part of `recompute`)."""
    ddp_buckets: int
    """DDP's gradient buckets: a second float32 copy of the trainable gradients (P > 1 under DDP)."""
    fsdp_gathered: int
    """FSDP2: unsharded parameters of the root (embeddings, final norm, head) and of the blocks in flight, plus
    one block's unsharded gradients."""
    activations: int
    """Tensors the forward saves for backward for B×T tokens (with checkpointing: each block's input)."""
    recompute: int
    """Activation checkpointing: one block's activations and weight casts rebuilt during backward (0 without)."""
    loss_head: int
    """The LM loss: one chunk's fp32 logits (+ their bf16 gradient), bf16 copies of the head weight and hidden
    states, and the head / hidden-state gradients held from forward to backward; a masked-LM head's full logits."""
    optimizer_step: int
    """Temporaries of the optimizer step: torch's per-tensor AdamW (CPU) builds √v and √v / c for one tensor at a
    time, 2 × 4 bytes × the largest trainable tensor; the fused CUDA kernel none."""
    head_grad: int
    """The LM head's fp32 gradient (V·C) as backward starts, beside the copy `loss_head` holds (0 when frozen)."""
    tokens: int
    """B×T tokens per micro batch."""

    @property
    def persistent(self) -> int:
        """What lives across steps: weights, optimizer states, DDP buckets."""
        return self.weights + self.optimizer + self.master_weights + self.ddp_buckets

    @property
    def forward_end(self) -> int:
        """Transient memory at the end of the forward pass and the start of backward, where the loss turns its held
        head gradient into the parameter's (a second copy for a moment) and checkpointing recomputes the last block."""
        return (self.activations + self.autocast_copies + self.loss_head + self.head_grad + self.recompute
                + self.fsdp_gathered)

    @property
    def backward_end(self) -> int:
        """Transient memory at the end of backward (all gradients, one block's recomputed activations)."""
        return self.gradients + self.recompute + self.fsdp_gathered

    @property
    def step(self) -> int:
        """Transient memory during the optimizer step: the gradients it uses and the step's temporaries."""
        return self.step_gradients + self.optimizer_step

    @property
    def peak(self) -> int:
        """Estimated high-water mark: persistent + the largest of forward end, backward end and the step."""
        return self.persistent + max(self.forward_end, self.backward_end, self.step)

    @property
    def total(self) -> int:
        """Sum of every term (an upper bound on the peak)."""
        return (self.persistent + max(self.gradients, self.step_gradients) + self.autocast_copies + self.fsdp_gathered
                + self.activations + self.recompute + self.loss_head + self.head_grad + self.optimizer_step)

    def to_dict(self) -> dict[str, int]:
        return dict(asdict(self), persistent=self.persistent, forward_end=self.forward_end,
                    backward_end=self.backward_end, step=self.step, peak=self.peak, total=self.total)


def loss_chunk(device: str) -> int:
    """Tokens per chunk of `linear_cross_entropy` (its default): 256 on CPU, 4096 on accelerators."""
    return 256 if device == "cpu" else 4096


def attention_kernel(cfg: ModelConfig, setup: TrainSetup) -> Literal["sdpa", "matmul"]:
    """Which attention `Attention.forward` runs in training: `matmul_attention` when the queries are bf16 on CPU
    and T ≤ 1024 (RoPE multiplies bf16 queries by the residual stream's dtype, so under autocast with an fp32
    stream they reach attention as fp32 and take SDPA); SDPA (flash / memory-efficient, O(T) saved) otherwise."""
    stream = _stream_bytes(setup)
    q_bf16 = setup.precision == "bf16" and (cfg.position != "rope" or stream == 2)
    cpu = setup.device == "cpu" and setup.seq_len <= MATMUL_ATTENTION_MAX_T
    return "matmul" if cpu and q_bf16 else "sdpa"


def _stream_bytes(setup: TrainSetup) -> int:
    """Bytes per element of the residual stream: the embedding's dtype (fp32, or bf16 for a frozen LoRA base)."""
    if setup.method != "full" and setup.precision != "fp32":
        return 2
    return 4


def _norm_saved(cfg: ModelConfig, r: int, trains: bool = True) -> int:
    """Bytes per token a norm saves: RMSNorm (composite) its input, the normalised input (only when its weight
    trains) and 1/rms — a frozen one its float32 input and 1/rms; LayerNorm its input, mean and 1/std."""
    c = cfg.hidden_size
    if cfg.norm == "layernorm":
        return r * c + 8  # mean and 1/std are float32
    return r * (2 * c + 1) if trains else 4 * (c + 1)


def activation_bytes(cfg: ModelConfig, setup: TrainSetup) -> tuple[int, int, int]:
    """(per block per token, global per token, per sequence) bytes that autograd saves in the forward, without
    checkpointing. Global: embedding indices, RoPE cos/sin, the final norm and a masked-LM head; per sequence:
    the boolean causal mask of the matmul attention path."""
    c, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    tp = setup.tp  # heads and MLP width per process
    q, kv, h, f = cfg.num_heads * d // tp, cfg.num_kv_heads * d // tp, cfg.num_heads // tp, f // tp
    e = DTYPE_BYTES[setup.precision]  # compute dtype
    r = _stream_bytes(setup)  # residual stream dtype
    casts = e != r  # autocast casts a linear's input once per linear
    gated = cfg.mlp == "gated"
    t = setup.seq_len
    trains = setup.method == "full"
    seq = tp if setup.sequence_parallel else 1  # sequence parallelism: a process keeps T / tp positions of norms
    block = 2 * _norm_saved(cfg, r, trains) // seq
    block += ((3 if casts else 1) * c + q + ((2 if gated else 1) if casts else 1) * c + f) * e  # linear inputs
    block += (3 * f if gated else f) * e  # activation input, (gate product operands)
    if attention_kernel(cfg, setup) == "matmul":
        block += (3 * q + h * t) * e  # scaled q, k and v with heads repeated, softmax probabilities (H·S)
        per_seq = t * t  # the bool causal mask (T, S)
    else:
        block += (q + 2 * kv) * e + 4 * h  # q, k, v and the fp32 log-sum-exp
        per_seq = 0
    if setup.method != "full":  # each adapter's r-wide intermediate (and its input cast when the stream is fp32)
        chosen = [n for n in _adapted(cfg, setup) if n.startswith("blocks.0.")]
        block += sum((setup.lora_rank + (linear_layers(cfg)[n][0] if casts else 0)) * e for n in chosen)
    glob = 8 * (1 + (cfg.position == "learned") + (cfg.type_vocab_size > 0))  # int64 indices of each lookup
    if cfg.embed_norm:
        glob += _norm_saved(cfg, r, trains)
    if cfg.position == "rope":
        glob += 2 * d * r  # cos, sin (B, 1, T, D)
    if cfg.final_norm:
        glob += _norm_saved(cfg, r, trains)
    if cfg.head in ("mlm", "pretraining"):
        glob += 3 * c * e + _norm_saved(cfg, e, trains)  # dense, activation and decoder inputs; the norm's input
    if cfg.pooler or cfg.head == "pretraining":
        per_seq += c * e * (2 if casts else 1)  # tanh output (NSP / classifier input), the pooler input's cast
    elif cfg.head == "classifier":
        per_seq += c * e  # the pooled token, input of the score layer
    return block, glob, per_seq


def _adapted(cfg: ModelConfig, setup: TrainSetup) -> list[str]:
    return trainable_parameters(cfg, setup.method, setup.lora_rank, setup.lora_targets).adapted_layers


def _block_bytes(shapes: dict[str, tuple[int, ...]], nbytes: dict[str, int], layer: int) -> int:
    return sum(nbytes[n] for n in shapes if n.startswith(f"blocks.{layer}."))


def training_memory(cfg: ModelConfig, setup: TrainSetup | None = None) -> TrainMemory:
    """Training memory of one device for `setup` (see the module docstring for what each term holds)."""
    s = setup or TrainSetup()
    s.validate()
    for what, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % s.tp:
            raise InputError(f"tp: {s.tp} does not divide the model's {what} ({n}); tensor parallelism splits "
                             "heads and the MLP width evenly")
    p = s.devices // s.tp  # data-parallel processes
    e = DTYPE_BYTES[s.precision]
    shapes = parameter_shapes(cfg)
    split = _tp_split(cfg, shapes, s.tp)
    numel = {n: _prod(sh) // split[n] for n, sh in shapes.items()}
    tc = trainable_parameters(cfg, s.method, s.lora_rank, s.lora_targets, block_size=s.quant_block_size,
                              double_quant=s.double_quant)
    linears = linear_layers(cfg)
    nf4 = {f"{n}.weight" for n in linears if n.startswith("blocks.")} if s.method == "qlora" else set()
    keep = [TASK_HEADS[cfg.head]] if cfg.head in TASK_HEADS else []  # LoRA's default modules_to_save
    trains = {n for n in shapes if s.method == "full" or any(n.startswith(m + ".") for m in keep)}
    # bytes as stored: trainable fp32; frozen in the autocast dtype (build_model casts them); QLoRA's NF4 weights
    stored = {n: 4 * k if n in trains else nf4_bytes(k, s.quant_block_size, s.double_quant) if n in nf4 else e * k
              for n, k in numel.items()}
    adapters = 4 * tc.adapters  # fp32 A and B
    shard = p if s.parallel == "fsdp" else 1
    trainable = 4 * (sum(numel[n] for n in trains) + tc.adapters)  # bytes of fp32 trainable values on a process
    weights = -(-(sum(stored.values()) + adapters) // shard)
    grads = step_grads = -(-trainable // shard)
    optimizer = -(-(s.optimizer_states * trainable) // shard)
    if s.parallel in ("zero1", "zero2") and p > 1:
        optimizer = -(-(s.optimizer_states * trainable) // p)
        step_grads = -(-trainable // p)
        # ZeRO-2: each gradient goes to its owner as backward makes it; one other-owned one at most is alive
        grads = step_grads + 4 * max((numel[n] for n in trains), default=0) if s.parallel == "zero2" else grads
    tokens = s.micro_batch * s.seq_len
    block_mm = sum(i * o for n, (i, o, _) in linears.items() if n.startswith("blocks.")) // s.tp
    copies = block_copies = 0
    if s.precision != "fp32":
        copies = e * (block_mm if s.method == "full" else tc.adapters)
        block_copies = copies // max(cfg.num_layers, 1)
        if s.method == "full":  # head linears (and a masked-LM decoder's embedding) run through autocast too
            copies += e * sum(i * o for n, (i, o, _) in linears.items() if not n.startswith("blocks.")
                              and n != "lm_head")
            copies += e * cfg.vocab_size * cfg.hidden_size if cfg.head in ("mlm", "pretraining") else 0
    ddp = trainable if s.parallel in ("ddp", "zero1") and p > 1 else 0
    gathered = 0
    if s.parallel == "fsdp" and p > 1:
        root = sum(b for n, b in stored.items() if not n.startswith("blocks."))
        blocks = [_block_bytes(shapes, stored, i) for i in range(cfg.num_layers)]
        block_grads = max((4 * sum(numel[n] for n in shapes if n.startswith(f"blocks.{i}.")) if s.method == "full"
                           else 0) for i in range(cfg.num_layers)) if cfg.num_layers else 0
        gathered = root + FSDP_PREFETCH_BLOCKS * max(blocks, default=0) + block_grads
    block, glob, per_seq = activation_bytes(cfg, s)
    if s.activation_checkpointing:
        r = _stream_bytes(s)
        seq = s.tp if s.sequence_parallel else 1  # the blocks' inputs: T / tp positions each under sequence parallel
        acts = tokens * (cfg.num_layers * cfg.hidden_size * r // seq + glob) + s.micro_batch * per_seq
        recompute, copies = tokens * block + block_copies, 0  # casts are saved only while a block recomputes
    else:
        acts = tokens * (cfg.num_layers * block + glob) + s.micro_batch * per_seq
        recompute = 0
    head_trains = s.method == "full" and cfg.head == "lm"
    head_grad = 4 * cfg.vocab_size // vocab_split(cfg, s.tp) * cfg.hidden_size if head_trains else 0
    sizes = [numel[n] for n in trains] + [s.lora_rank * max(linears[n][:2]) for n in tc.adapted_layers]
    step = 2 * 4 * -(-max(sizes, default=0) // shard) if s.device == "cpu" and s.optimizer_states else 0
    return TrainMemory(weights, grads, step_grads, optimizer, 0, copies, ddp, gathered, acts, recompute,
                       _loss_head(cfg, s, head_trains), step, head_grad, tokens)


def vocab_split(cfg: ModelConfig, tp: int) -> int:
    """Processes a causal LM's token embedding and head are split over by vocabulary rows: tp when it divides the
    vocabulary (as `engine.distributed.tensor_parallel` does), else 1."""
    return tp if cfg.head == "lm" and cfg.vocab_size % tp == 0 else 1


def _tp_split(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], tp: int) -> dict[str, int]:
    """Parameter name -> how many processes share it: block linears (and column-split biases) over tp, and the
    vocabulary rows of a causal LM's embedding and head."""
    cols = ("attn.q.", "attn.k.", "attn.v.", "mlp.gate.", "mlp.up.")
    rows = ("attn.o.weight", "mlp.down.weight")
    vocab = ("embed.tokens.weight", "lm_head.weight")
    return {n: tp if n.startswith("blocks.") and (any(c in n for c in cols) or n.endswith(rows))
            else vocab_split(cfg, tp) if n in vocab else 1 for n in shapes}


def _loss_head(cfg: ModelConfig, s: TrainSetup, head_trains: bool) -> int:
    """Bytes the loss keeps: see `TrainMemory.loss_head`."""
    tokens = s.micro_batch * s.seq_len
    c, v = cfg.hidden_size, cfg.vocab_size // vocab_split(cfg, s.tp)  # a process's vocabulary rows
    e = DTYPE_BYTES[s.precision]
    if cfg.head in ("mlm", "pretraining"):
        return tokens * v * (e + 4)  # logits in the compute dtype and the float32 log-softmax of the loss
    if cfg.head != "lm":
        return 0
    chunk = min(loss_chunk(s.device), tokens)
    logits = chunk * v * (4 + (e if e != 4 else 0))  # fp32 log-softmax of one chunk, its gradient in bf16
    low = (e * (v * c + tokens * c)) if e != 4 else 0  # copies of the head weight and hidden states
    held = tokens * c * e + (4 * v * c if head_trains else 0)  # grad of hidden states, of the head weight
    return logits + low + held


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for k in shape:
        out *= k
    return out


@dataclass
class InferenceMemory:
    """Inference memory of one device, in bytes."""

    weights: int
    """Parameters in the serving dtype (int8 / int4 count their codes and per-group fp16 scales)."""
    kv_cache: int
    """Keys and values: 2 × layers × K·D × batch × context × bytes."""
    batch: int
    """Sequences served at once."""
    context: int
    """Tokens per sequence the cache holds (prompt + generated)."""

    @property
    def total(self) -> int:
        """weights + kv_cache."""
        return self.weights + self.kv_cache

    def to_dict(self) -> dict[str, int]:
        return dict(asdict(self), total=self.total)


def inference_memory(cfg: ModelConfig, batch: int, context: int, dtype: str = "bf16",
                     weight_bits: int | None = None, group_size: int = 32) -> InferenceMemory:
    """Weights + a dense KV cache for `batch` sequences of `context` tokens in `dtype` (as `DenseKVCache`);
    `weight_bits` 8 or 4 stores the block linears as QuantLinear codes with an fp16 scale per `group_size`."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPE_BYTES)}, found {dtype!r}")
    if batch < 1 or context < 1:
        raise ValueError(f"batch and context: expected integers >= 1, found {batch}, {context}")
    e = DTYPE_BYTES[dtype]
    shapes = parameter_shapes(cfg)
    block_weights = {f"{n}.weight" for n in linear_layers(cfg) if n.startswith("blocks.")}
    weights = 0
    for n, sh in shapes.items():
        k = _prod(sh)
        if weight_bits in (4, 8) and n in block_weights:
            weights += k * weight_bits // 8 + 2 * (k // group_size)  # codes + fp16 scales
        else:
            weights += k * e
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * batch * context * e
    return InferenceMemory(weights, kv, batch, context)
