"""`lmforge export MODEL --format onnx|gguf --output PATH [quantize=none|int8|int4]`: a model in a deployment format,
checked against lmforge and measured before and after (compress.json: size, held-out bits per byte, decode tokens/s).

onnx: the graph of lmforge's own module with a KV cache (`models.onnx.export_onnx`), optionally quantized by ONNX
Runtime's own tools (int8 `quantize_dynamic`, int4 `MatMulNBits` blocks); its logits are compared with lmforge's on a
prefill and a few decode steps, held-out text is scored through ONNX Runtime by lmforge's perplexity code, and decode
speed is lmforge's engine before and the torch-free runner (`lmforge generate --backend onnxruntime`) after.
gguf: `lmforge convert`'s GGUF writer (floats, or the Q8_0 / Q4_0 / Q4_1 blocks of a quantized lmforge folder's
codes), measured by lmforge reading the file back. See docs/compression.md.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..eval.compression import CompressEval

POSITIONAL = ("model",)
GGUF_FILE = "model.gguf"
"""The file a GGUF export writes inside a folder output (a pipeline stage's folder)."""


@dataclass
class Config:
    model: str
    """Model: a Hugging Face folder, a quantized lmforge folder, a .gguf file, a hub id or a local alias."""
    format: Literal["onnx", "gguf"] = "onnx"
    """onnx: a folder ONNX Runtime runs (a graph with a KV cache, tokenizer, lmforge_onnx.json); gguf: llama.cpp's."""
    output: str = "runs/export"
    """onnx: a folder; gguf: a file ending in .gguf, or a folder that gets model.gguf (as in a pipeline)."""
    quantize: Literal["none", "int8", "int4"] = "none"
    """onnx: ONNX Runtime's weight quantization of the linear layers and the LM head: int8 (quantize_dynamic, per
    channel) or int4 (MatMulNBits, symmetric blocks); a GGUF takes a folder from `lmforge quantize` as MODEL instead."""
    block_size: int = 32
    """onnx int4: weights sharing one scale (a power of two >= 16)."""
    exclude: list[str] = field(default_factory=list)
    """onnx int8 / int4: linear layers kept float, as globs of module names ("*.mlp.down", "lm_head")."""
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """onnx: the graph's compute and KV-cache dtype (default float32); gguf: the float tensors' dtype (default: the
    source's, as `lmforge convert`)."""
    opset: int = 18
    """onnx: the graph's ONNX opset."""
    check_steps: int = 8
    """onnx: greedy decode steps after the prefill in the check of the graph's logits against lmforge."""
    eval: CompressEval = field(default_factory=CompressEval)
    """What compress.json measures before and after (onnx: perplexity tasks only after; gguf: no decode speed)."""

    def validate(self) -> None:
        if self.format == "gguf" and (self.quantize != "none" or self.exclude):
            raise ValueError(f"quantize={self.quantize} exclude={self.exclude} apply to --format onnx; expected "
                             f"quantize=none for gguf (a quantized GGUF comes from a `lmforge quantize` folder as "
                             f"MODEL)")
        if self.format == "onnx" and self.dtype == "bfloat16":
            raise ValueError("an ONNX graph's dtype is float32 or float16, found bfloat16")
        if self.format == "onnx" and self.quantize == "int8" and self.dtype == "float16":
            raise ValueError("quantize=int8 (dynamic quantization) needs a float32 graph, found dtype float16")
        if self.format == "onnx" and self.output.endswith(".gguf"):
            raise ValueError(f"an ONNX export is a folder, found output {self.output!r}; use --format gguf for .gguf")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, found {self.block_size}")
        if self.check_steps < 0:
            raise ValueError(f"check_steps must be >= 0, found {self.check_steps}")


def main(cfg: Config) -> int:
    from ..eval.compression import disk_size
    from ..models.loading import resolve

    if cfg.format == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            print(f"error: export --format onnx needs {', '.join(missing)}: pip install 'lmforge[onnx]'",
                  file=sys.stderr)
            return 1
    source_bytes = disk_size(resolve(cfg.model))  # FileNotFoundError (exit 2) names a missing model
    return (_onnx if cfg.format == "onnx" else _gguf)(cfg, source_bytes)


def _onnx(cfg: Config, source_bytes: int) -> int:
    import shutil

    import torch

    from ..errors import InputError
    from ..eval.compression import compare_table, disk_size, measure, write_report
    from ..eval.tasks import parse_task
    from ..inference.onnx_runner import OnnxGenerator, decode_speed
    from ..models.onnx import export_onnx, quantize_onnx
    from ..transforms.peft import load

    model, tok = load(cfg.model, dtype=torch.float32)
    if tok is None:
        raise InputError(f"{cfg.model} has no tokenizer.json; an ONNX export carries one for the runner")
    before: dict[str, Any] = {}
    if cfg.eval.enabled:
        print(f"measuring {cfg.model} before export (lmforge, float32)", flush=True)
        before = measure(model, tok, cfg.eval)
    before.update(size_bytes=source_bytes, float32_bytes=4 * model.num_parameters())
    out = Path(cfg.output)
    graph = out if cfg.quantize == "none" else out.with_name(f".{out.name}.float")
    threads = torch.get_num_threads()  # the engine's threads: both sides decode on the same cores
    ids = tok.encode(cfg.eval.prompt, add_special_tokens=False)
    start = time.perf_counter()
    export_onnx(model, tok, graph, opset=cfg.opset, dtype=cfg.dtype or "float32")
    extra: dict[str, Any] = {"seconds": round(time.perf_counter() - start, 1), "threads": threads}
    check = {"float": logit_gap(model, OnnxGenerator(graph, threads), ids, cfg.check_steps)}
    if cfg.quantize != "none":
        try:
            extra["float_graph_bytes"] = disk_size(graph)
            quantize_onnx(graph, out, cfg.quantize, cfg.block_size, exclude=cfg.exclude)
        finally:
            shutil.rmtree(graph, ignore_errors=True)
        extra["seconds"] = round(time.perf_counter() - start, 1)
        check[cfg.quantize] = logit_gap(model, OnnxGenerator(out, threads), ids, cfg.check_steps)
    for name, gap in check.items():
        print(f"{name} graph vs lmforge: max |Δ logits| {gap['prefill']:.2e} over the prefill ({len(ids)} tokens), "
              f"{gap['decode']:.2e} over {cfg.check_steps} decode steps", flush=True)
    if check["float"]["prefill"] > 1e-3 and (cfg.dtype or "float32") == "float32":
        print("warning: the float32 graph's logits differ from lmforge's by more than 1e-3", file=sys.stderr)
    after: dict[str, Any] = {"size_bytes": disk_size(out)}
    if cfg.eval.enabled:
        gen = OnnxGenerator(out, threads)
        ppl = [t for t in cfg.eval.tasks if parse_task(t).kind == "perplexity"]
        print(f"measuring {out} (ONNX Runtime, {threads} threads)", flush=True)
        after = measure(GraphAsLM(gen, model.cfg), tok, dataclasses.replace(cfg.eval, tasks=ppl, decode_tokens=0), out)
        after["decode_tokens_per_s"] = decode_speed(gen, ids, cfg.eval.decode_tokens, cfg.eval.repeats) \
            if cfg.eval.decode_tokens else None
        if len(ppl) < len(cfg.eval.tasks):
            extra["not_measured_after"] = sorted(set(cfg.eval.tasks) - set(ppl))
            extra["why"] = "multiple-choice and generation tasks run on lmforge's KV cache; the graph is scored on " \
                           "perplexity tasks through ONNX Runtime"
    report = write_report(out, "export", cfg, before, after, {**extra, "logits_check": check})
    print(compare_table(before, after))
    print(f"wrote {out} and {report}")
    return 0


def _gguf(cfg: Config, source_bytes: int) -> int:
    from ..errors import InputError
    from ..eval.compression import compare_table, disk_size, measure, write_report
    from ..transforms.peft import load
    from .convert import Config as Convert
    from .convert import main as convert

    into_folder = not cfg.output.endswith(".gguf")
    path = Path(cfg.output) / GGUF_FILE if into_folder else Path(cfg.output)
    measured = dataclasses.replace(cfg.eval, decode_tokens=0)  # a GGUF's decode speed is llama.cpp's to report
    before: dict[str, Any] = {}
    if cfg.eval.enabled:
        model, tok = load(cfg.model, dtype=cfg.dtype)
        print(f"measuring {cfg.model} before export (lmforge)", flush=True)
        before = measure(model, tok, measured)
        del model
    before["size_bytes"] = source_bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        convert(Convert(src=cfg.model, dst=str(path), dtype=cfg.dtype))  # floats, or a quantized folder's blocks
    except ValueError as e:  # what GGUF cannot hold (a family, scaled RoPE, a quantization without a block type)
        raise InputError(f"export --format gguf: {e}") from None
    seconds = round(time.perf_counter() - start, 1)
    after: dict[str, Any] = {"size_bytes": disk_size(path)}
    if cfg.eval.enabled:
        print(f"measuring {path} read back by lmforge", flush=True)
        reloaded, tok = load(path, dtype=cfg.dtype)
        after = measure(reloaded, tok, measured, path)
    report = write_report(path.parent if into_folder else path, "export", cfg, before, after, {"seconds": seconds})
    print(compare_table(before, after))
    print(f"wrote {report}")
    return 0


def logit_gap(model, gen, ids: list[int], steps: int) -> dict[str, float]:
    """max |Δ logits| between the graph in ONNX Runtime (`gen`, an OnnxGenerator) and lmforge's `model` over a
    prefill of `ids` and then `steps` greedy decode steps feeding the graph's presents back; lmforge re-runs the
    whole sequence each step (no cache), so the graph's KV cache is checked too."""
    import numpy as np
    import torch

    seq, step, past = list(ids), list(ids), gen.empty_past()
    gaps = []
    for _ in range(steps + 1):
        positions = np.arange(len(seq) - len(step), len(seq))[None]  # (1, T)
        logits, past = gen.forward(np.asarray([step]), positions, past)  # (1, T, V)
        with torch.no_grad():
            ref = model(torch.tensor([seq])).logits[0, -len(step):].float().numpy()  # (T, V)
        gaps.append(float(np.abs(logits[0] - ref).max()))
        step = [int(logits[0, -1].argmax())]
        seq += step
    return {"prefill": gaps[0], "decode": max(gaps[1:], default=0.0)}


class GraphAsLM:
    """An exported graph as lmforge's perplexity code calls a causal LM (`model(ids).logits`, `cfg`, `device`,
    eval/train), each call one prefill with no past: held-out bits per byte through ONNX Runtime, scored by the same
    code that scored lmforge before."""

    training = False
    device = "cpu"

    def __init__(self, gen, cfg):
        self.gen, self.cfg = gen, cfg

    def eval(self) -> GraphAsLM:
        return self

    def train(self, mode: bool = True) -> GraphAsLM:
        return self

    def __call__(self, input_ids, **_: Any):
        from types import SimpleNamespace

        import numpy as np
        import torch

        b, t = input_ids.shape
        positions = np.broadcast_to(np.arange(t), (b, t))  # (B, T)
        logits, _ = self.gen.forward(input_ids.cpu().numpy(), positions, self.gen.empty_past(b))  # (B, T, V)
        return SimpleNamespace(logits=torch.from_numpy(logits))
