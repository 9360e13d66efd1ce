"""ONNX export of a causal LM with an explicit KV cache, and int8 / int4 quantization of the graph by ONNX Runtime.

One graph serves prefill (P = 0 past tokens) and decode (T = 1) through dynamic axes, in the layout Hugging Face
Optimum and ONNX Runtime GenAI use: inputs `input_ids` (B, T), `attention_mask` (B, P + T), `position_ids` (B, T)
and `past_key_values.{i}.key/value` (B, K, P, D); outputs `logits` (B, T, V) and `present.{i}.key/value`
(B, K, P + T, D). The folder also holds the tokenizer, config.json and `lmforge_onnx.json`, which the torch-free
runner (`lmforge.inference.onnx_runner`) reads.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fnmatch
import json
import logging
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import recover_folder, replace_folder, staging_folder
from ..errors import InputError, one_line
from . import hf
from .transformer import Transformer

__all__ = ["META_FILE", "MODEL_FILE", "PastCache", "export_onnx", "io_names", "name_projections", "quantize_onnx"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
"""The graph's file name inside an export folder."""
META_FILE = "lmforge_onnx.json"
"""What the runner needs to know about the graph (layers, heads, names, dtype, end-of-sequence ids)."""
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_EXTERNAL_BYTES = 1_500_000_000  # protobuf caps a file at 2 GiB: larger weights go to model.onnx.data


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of the exported graph, in order."""
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class PastCache:
    """An export-only `KVCache`: the past keys and values of each layer arrive as tensors (B, K, P, D) and the
    presents (B, K, P + T, D) are collected for the graph's outputs. Positions come from `position_ids`, so
    `length()` is 0 and the model builds no mask; this cache masks causally with the past offset P, the sliding
    window and the attention mask (B, P + T) itself, with shapes only (no data-dependent branch)."""

    def __init__(self, past: list[tuple[Tensor, Tensor]], attention_mask: Tensor, sliding_window: int | None):
        self.past, self.attention_mask, self.window = past, attention_mask, sliding_window
        self.present: list[tuple[Tensor, Tensor]] = [None] * len(past)  # type: ignore[list-item]
        self.allowed: Tensor | None = None

    def length(self) -> int:
        return 0

    def _allowed(self, t: int, s: int) -> Tensor:
        """Boolean (B, 1, T, S): causal over past + new keys, in the window, real keys only."""
        if self.allowed is None:
            dev = self.attention_mask.device
            qpos = torch.arange(t, device=dev)[:, None] + (s - t)  # (T, 1): absolute positions of the queries
            kpos = torch.arange(s, device=dev)[None, :]  # (1, S)
            allowed = kpos <= qpos  # (T, S)
            if self.window is not None:
                allowed = allowed & (qpos - kpos < self.window)
            allowed = allowed[None, None] & self.attention_mask[:, None, None, :].bool()  # (B, 1, T, S)
            # a fully masked row (a left-pad query) would give NaN; let it attend everywhere (its output is unused)
            self.allowed = allowed | ~allowed.any(-1, keepdim=True)
        return self.allowed

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(QKᵀ/√D + M)V (Vaswani et al. 2017, eq. 1) over past + new keys; q (B, H, T, D), k and v
        (B, K, T, D) -> (B, H, T, D). The model's `mask` assumed no past, so M is this cache's own."""
        pk, pv = self.past[layer]
        keys, values = torch.cat((pk, k), 2), torch.cat((pv, v), 2)  # (B, K, S, D)
        self.present[layer] = (keys, values)
        b, h, t, d = q.shape
        kv, s = keys.shape[1], keys.shape[2]
        if h != kv:  # grouped-query attention: each key head serves h // kv query heads
            keys = keys[:, :, None].expand(b, kv, h // kv, s, d).reshape(b, h, s, d)  # (B, H, S, D)
            values = values[:, :, None].expand(b, kv, h // kv, s, d).reshape(b, h, s, d)
        scores = (q @ keys.transpose(-1, -2)).float() * d ** -0.5  # (B, H, T, S)
        scores = scores.masked_fill(~self._allowed(t, s), float("-inf"))
        return (scores.softmax(-1).to(q.dtype) @ values)  # (B, H, T, D)


class _WithCache(nn.Module):
    """The model as a function of tensors: (ids, mask, positions, [past k, v per layer]) -> (logits, *presents)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[Tensor]):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = PastCache(pairs, attention_mask, self.model.cfg.sliding_window)
        logits = self.model(input_ids, position_ids=position_ids, cache=cache).logits  # (B, T, V)
        return (logits.float(), *[t for pair in cache.present for t in pair])


def _check_exportable(model: nn.Module) -> None:
    cfg = getattr(model, "cfg", None)
    if not isinstance(model, Transformer) or cfg is None:
        raise InputError(f"export_onnx needs an lmforge Transformer, found {type(model).__name__}")
    if not cfg.causal or cfg.head != "lm":
        raise InputError(f"export_onnx exports causal language models; found causal={cfg.causal}, head={cfg.head!r} "
                         f"(family {cfg.family!r}); expected a decoder with an LM head (llama, mistral, qwen2, gpt2)")
    if getattr(model, "prompt", None) is not None:
        raise InputError("export_onnx: the model carries prompt-tuning virtual tokens; expected a plain model")
    odd = sorted({type(m).__name__ for m in model.modules()} - _PLAIN)
    if odd:
        raise InputError(f"export_onnx: the model holds {odd} layers; expected plain nn.Linear/Embedding/norm "
                         f"layers (merge LoRA first; export float weights, then quantize the graph with "
                         f"quantize_onnx)")


_PLAIN = {"Transformer", "Embeddings", "Embedding", "ModuleList", "Block", "Attention", "MLP", "Linear", "RMSNorm",
          "LayerNorm"}


def export_onnx(model: Transformer, tokenizer, out_dir: str | Path, *, opset: int = 18,
                dtype: str | torch.dtype = "float32", external_data: bool | None = None) -> Path:
    """Write `out_dir/model.onnx`, the tokenizer, config.json and lmforge_onnx.json; returns the graph's path.
    The folder is replaced atomically. `dtype` is the graph's compute and KV-cache dtype (float32, or float16
    for accelerators); logits are always float32. `external_data` puts the weights in `model.onnx.data` (None:
    when they pass 1.5 GB, as protobuf caps a file at 2 GiB)."""
    _check_exportable(model)
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise InputError(f"export_onnx: dtype {name!r} is not supported; expected one of {sorted(_DTYPES)}")
    if not 7 <= opset <= 23:
        raise InputError(f"export_onnx: opset {opset} is out of range; expected 18 (or 7..23)")
    if tokenizer is None:
        raise InputError("export_onnx: no tokenizer; the runner needs tokenizer.json beside the graph")
    try:
        import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter builds the graph with it
    except ImportError:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install 'lmforge[onnx]'") from None
    cfg = model.cfg
    dst = Path(out_dir)
    recover_folder(dst)
    tmp = staging_folder(dst)
    start = time.perf_counter()
    try:
        # a CPU copy: the caller's model keeps its dtype, device and mode (the engine's packed weights stay valid)
        clone = _copy_for_export(model, _DTYPES[name])
        if external_data is None:
            external_data = sum(p.numel() * p.element_size() for p in clone.parameters()) > _EXTERNAL_BYTES
        _export_graph(_WithCache(clone), tmp / MODEL_FILE, opset, _DTYPES[name], external_data)
        tokenizer.save(tmp)
        conf = hf.config_to_hf(cfg)
        conf["dtype"] = name
        (tmp / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
        (tmp / META_FILE).write_text(json.dumps(_meta(cfg, tokenizer, name), indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, dst)
    log.info("exported %s to %s in %.1fs", cfg.family, dst, time.perf_counter() - start)
    return dst / MODEL_FILE


def _copy_for_export(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A CPU copy of the model in `dtype` (the export traces on CPU; the RoPE buffer stays float32). A tied LM
    head becomes its own matrix: in the graph it is then a MatMul on a constant, which ORT's quantizers quantize
    (SmolLM2's head is a fifth of its weights), instead of a MatMul on the transposed embedding, which they skip."""
    cfg = dataclasses.replace(model.cfg, tie_embeddings=False)
    with torch.device("meta"):
        clone = Transformer(cfg)
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.tokens.weight"]
    clone.load_state_dict(state, assign=True)
    clone.reset_rope()  # the non-persistent RoPE buffer, on the CPU (where the loaded weights are)
    return clone.eval()


def _export_graph(wrapped: _WithCache, path: Path, opset: int, dtype: torch.dtype, external: bool) -> None:
    """Trace with torch.export (dynamo) on example shapes B = 2, T = 3, P = 4, all three dynamic."""
    cfg = wrapped.model.cfg
    b, t, p = 2, 3, 4
    ids = torch.zeros(b, t, dtype=torch.long)
    mask = torch.ones(b, p + t, dtype=torch.long)
    pos = torch.arange(p, p + t).expand(b, t).contiguous()
    past = [torch.zeros(b, cfg.num_kv_heads, p, cfg.head_dim, dtype=dtype) for _ in range(2 * cfg.num_layers)]
    inputs, outputs = io_names(cfg.num_layers)
    batch, new, total = torch.export.Dim("batch"), torch.export.Dim("new"), torch.export.Dim("total")
    past_len = torch.export.Dim("past")
    shapes = ({0: batch, 1: new}, {0: batch, 1: total}, {0: batch, 1: new}, [{0: batch, 2: past_len} for _ in past])
    try:
        with _quiet_logging():
            program = torch.onnx.export(wrapped, (ids, mask, pos, past), dynamo=True, opset_version=opset,
                                        input_names=inputs, output_names=outputs, dynamic_shapes=shapes,
                                        optimize=True, verbose=False)
    except Exception as e:
        raise RuntimeError(f"export_onnx: torch.onnx.export failed for {cfg.family!r}: {one_line(str(e))[:400]}") from e
    name_projections(program.model.graph)
    program.save(str(path), external_data=external)


def name_projections(graph) -> None:
    """Name the MatMul of each linear layer after its module (`blocks.3.mlp.down`, `lm_head`), from the name scopes
    the exporter records, so quantize_onnx can keep chosen layers float and the graph reads like the model."""
    for node in graph:
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if weight is None or weight.const_value is None or not scopes:
            continue
        scopes = ast.literal_eval(scopes)  # ['', 'model', 'model.blocks.0', ..., 'model.blocks.0.attn.q', 'linear_3']
        if len(scopes) >= 2 and scopes[-1].startswith("linear"):
            module = scopes[-2].removeprefix("model.")
            node.name = "lm_head" if module == "model" else module  # Transformer.project is the head's F.linear


def _meta(cfg, tokenizer, dtype: str) -> dict[str, Any]:
    eos = cfg.eos_token_id
    ids = {i for i in [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_id] if i is not None}
    inputs, outputs = io_names(cfg.num_layers)
    return {"format": 1, "family": cfg.family, "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "max_context": cfg.max_position_embeddings,
            "dtype": dtype, "eos_token_ids": sorted(ids), "bos_token_id": cfg.bos_token_id,
            "inputs": inputs, "outputs": outputs, "model_file": MODEL_FILE, "quantization": None}


def quantize_onnx(src_dir: str | Path, dst_dir: str | Path, kind: str = "int8", block_size: int = 32,
                  accuracy_level: int | None = 4, exclude: Sequence[str] = ()) -> Path:
    """Quantize an exported folder's graph with ONNX Runtime's own tools into `dst_dir` (the other files copied):
    int8 = `quantize_dynamic` (per-channel int8 weights, activations quantized per call); int4 = the
    `MatMulNBits` weight-only quantizer (symmetric blocks of `block_size` along the input dimension). Every
    linear layer's MatMul is quantized, the LM head included, unless its module name matches a glob in `exclude`
    (e.g. "*.mlp.down", "lm_head"); embeddings stay float. `accuracy_level` (int4) is ORT's compute type for
    MatMulNBits: 4 = int8 activations (fastest on CPU), 1 = float32, None = ORT's default."""
    src, dst = Path(src_dir), Path(dst_dir)
    if kind not in ("int8", "int4"):
        raise InputError(f"quantize_onnx: kind {kind!r} is not supported; expected 'int8' or 'int4'")
    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"quantize_onnx: block_size {block_size} must be a power of two >= 16")
    if not (src / MODEL_FILE).is_file() or not (src / META_FILE).is_file():
        raise InputError(f"quantize_onnx: {src} has no {MODEL_FILE} + {META_FILE}; expected a folder from export_onnx")
    meta = json.loads((src / META_FILE).read_text())
    if kind == "int8" and meta.get("dtype") != "float32":
        raise InputError(f"quantize_onnx: int8 (dynamic quantization) needs a float32 graph, found {meta.get('dtype')} "
                         f"in {src}; export with dtype='float32' (int4 takes float16 too)")
    if meta.get("quantization"):
        raise InputError(f"quantize_onnx: {src} is already quantized ({meta['quantization']}); expected a float export")
    with _quiet_logging():  # the quantizers' modules configure the root logger at INFO on import, and chatter
        try:
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError:
            raise ImportError("quantize_onnx needs ONNX Runtime: pip install 'lmforge[onnx]'") from None
    skipped = _excluded(onnx.load(str(src / MODEL_FILE), load_external_data=False), exclude, src)
    recover_folder(dst)
    tmp = staging_folder(dst)
    try:
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith(MODEL_FILE):
                shutil.copy2(f, tmp / f.name)
        large = (src / (MODEL_FILE + ".data")).exists()
        if kind == "int8":
            with _quiet_logging():
                quantize_dynamic(src / MODEL_FILE, tmp / MODEL_FILE, op_types_to_quantize=["MatMul"], per_channel=True,
                                 weight_type=QuantType.QInt8, use_external_data_format=large,
                                 nodes_to_exclude=skipped)
            meta["quantization"] = {"kind": "int8", "tool": "onnxruntime.quantization.quantize_dynamic",
                                    "per_channel": True, "exclude": list(exclude)}
        else:
            q = MatMulNBitsQuantizer(onnx.load(str(src / MODEL_FILE)), bits=4, block_size=block_size,
                                     is_symmetric=True, accuracy_level=accuracy_level,
                                     nodes_to_exclude=skipped)
            with _quiet_logging():
                q.process()
            q.model.save_model_to_file(str(tmp / MODEL_FILE), use_external_data_format=large)
            meta["quantization"] = {"kind": "int4", "tool": "onnxruntime MatMulNBitsQuantizer", "bits": 4,
                                    "block_size": block_size, "symmetric": True, "accuracy_level": accuracy_level,
                                    "exclude": list(exclude)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, dst)
    return dst / MODEL_FILE


def _excluded(graph, patterns: Sequence[str], where: Path) -> list[str]:
    """Names of the MatMul nodes whose (module) name matches one of the globs; each glob must match one."""
    names = [n.name for n in graph.graph.node if n.op_type == "MatMul"]
    chosen = []
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            shown = [n for n in names if not n.startswith("node_")][:8]
            raise InputError(f"quantize_onnx: exclude pattern {pattern!r} matches no linear layer of {where}; "
                             f"expected module names such as {shown}")
        chosen += [n for n in hits if n not in chosen]
    return chosen


@contextlib.contextmanager
def _quiet_logging():
    """Hold the root logger and ONNX Runtime's loggers at ERROR for the block, then restore the root logger's level
    and handlers as they were (a library's logging.basicConfig must not change the user's logging)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    names = ["onnxruntime", "torch.onnx", "onnxscript"]
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    root.setLevel(logging.ERROR)
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        for lg, lv in saved:
            lg.setLevel(lv)
