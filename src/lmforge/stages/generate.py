"""`lmforge generate`: text from a model, plain or through its chat template, streamed to the terminal; for a
classifier model, the label and class probabilities of each input; for a span (extractive QA) model, the answer to
each {"question", "context"} input line (one JSON line per input line)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..inference.options import SamplingOptions


@dataclass
class Source:
    """The model and the system message: the first keys of `generate` and `chat` (before the sampling ones)."""

    model: str
    """Model: a Hugging Face folder, a .gguf file, a hub id, or a local alias (smollm2-135m-instruct)."""
    system: str | None = None
    """System message (with the chat template)."""


@dataclass
class Options(SamplingOptions, Source):
    """Model and sampling options shared by `generate` and `chat`: Source's keys, SamplingOptions', then these."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the model."""
    device: str = "cpu"
    """Device to run on (cpu, cuda, cuda:1, ...)."""
    allow_pickle: bool = False
    """Allow loading pickle (.bin/.pt) checkpoints; only for files you trust."""


@dataclass
class Config(Options):
    prompt: str | None = None
    """Prompt text; read from standard input when omitted."""
    chat: bool = False
    """Wrap the prompt as a user message with the model's chat template."""
    backend: Literal["lmforge", "onnxruntime"] = "lmforge"
    """lmforge: its engine (torch); onnxruntime: MODEL is a folder from `lmforge export --format onnx`, decoded by ONNX
    Runtime without torch (dtype, device and allow_pickle do not apply)."""
    threads: int | None = None
    """onnxruntime: intra-op threads (default: ONNX Runtime's, one per physical core)."""

    def validate(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, found {self.threads}")
        if self.backend == "lmforge":
            super().validate()
        else:  # the same ranges, checked without importing torch
            from ..inference.onnx_runner import check_sampling

            check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.repetition_penalty)


def main(cfg: Config) -> int:
    prompt = cfg.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print("error: give --prompt TEXT or pipe the prompt on standard input", file=sys.stderr)
            return 2
        prompt = sys.stdin.read()
    if cfg.backend == "onnxruntime":
        return _generate_onnx(cfg, prompt)
    if (Path(cfg.model) / "lmforge_onnx.json").is_file():
        print(f"error: {cfg.model} is an ONNX export; expected --backend onnxruntime to run it", file=sys.stderr)
        return 2
    import torch

    from ..inference.engine import Engine
    from ..tokenizer.chat import encode_chat
    from ..transforms.peft import load

    model, tok = load(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, allow_pickle=cfg.allow_pickle)
    if tok is None:
        print(f"error: {cfg.model} has no tokenizer.json; generation needs one", file=sys.stderr)
        return 2
    if model.cfg.head == "classifier":
        return _classify(Engine(model, tok), tok, prompt if cfg.prompt is not None else prompt.splitlines())
    if model.cfg.head == "span":
        return _answer(model, tok, prompt.splitlines())
    if model.cfg.head != "lm":
        print(f"error: {cfg.model} has a {model.cfg.head!r} head; generate needs a causal LM, a classifier or a "
              f"span (question answering) model", file=sys.stderr)
        return 2
    if cfg.chat:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": prompt}]
        ids = encode_chat(tok, messages, add_generation_prompt=True).ids
    else:
        ids = tok.encode(prompt)
    steps = Engine(model, tok).stream([ids], cfg.params())
    return _print_stream((out.text, out.completion_tokens) for outs in steps for out in outs)


def _generate_onnx(cfg: Config, prompt: str) -> int:
    """Decode with ONNX Runtime from an exported folder (`inference.onnx_runner`); torch is never imported."""
    from ..inference.onnx_runner import OnnxGenerator

    try:
        gen = OnnxGenerator(cfg.model, threads=cfg.threads)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ids = gen.prompt_ids(prompt, cfg.chat, cfg.system)
    pieces = gen.stream_text(ids, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                             repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    return _print_stream((p.text, n) for n, p in enumerate(pieces, 1))


def _print_stream(texts: Iterator[tuple[str, int]]) -> int:
    """Write each (new text, tokens so far) as it comes, then the count and speed on standard error."""
    start, n = time.perf_counter(), 0
    for text, n in texts:
        sys.stdout.write(text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{n} tokens in {elapsed:.2f}s, {n / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _classify(engine, tok, texts: str | list[str]) -> int:
    """Print {"input", "output", "scores"} per text: the predicted label and its softmax probabilities (or the
    value of a regression head, alone), framed and tokenized as classification fine-tuning does."""
    import json

    from ..data.classify import ClassifyExample, classification_outputs, tokenize_examples

    texts = [texts] if isinstance(texts, str) else [t for t in texts if t.strip()]
    examples = [ClassifyExample(where="input", text=t, text_pair=None, label=0) for t in texts]
    tokenized, _ = tokenize_examples(examples, tok, engine.max_context)
    logits = engine.classify([t.input_ids for t in tokenized])  # (B, K)
    for out in classification_outputs(texts, logits, engine.model.cfg.id2label, digits=4):
        if out["scores"] is None:
            del out["scores"]
        print(json.dumps(out))
    return 0


def _answer(model, tok, lines: list[str]) -> int:
    """Print {"question", "answer", "score"} per input line {"question", "context"}: the best span of the context,
    windowed as QA fine-tuning does."""
    import json

    from ..data.qa import QAData, QAExample
    from ..objectives.span import answer_questions

    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            print(f"error: input line {n}: not JSON ({e.msg}); expected {{\"question\": ..., \"context\": ...}}",
                  file=sys.stderr)
            return 2
        if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) and rec[k].strip()
                                                for k in ("question", "context")):
            print(f"error: input line {n}: expected an object with non-empty \"question\" and \"context\" strings",
                  file=sys.stderr)
            return 2
        examples.append(QAExample(str(n), rec["question"], rec["context"], [], f"input line {n}"))
    settings = QAData().within(model.cfg.max_position_embeddings)
    for ex, a in zip(examples, answer_questions(model, tok, examples, settings)):
        print(json.dumps({"question": ex.question, "answer": a["answer"], "score": round(a["score"], 4)}))
    return 0
