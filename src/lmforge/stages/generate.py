"""`lmforge generate`: text from a model, plain or through its chat template, streamed to the terminal; for a
classifier model, the label and class probabilities of each input (one JSON line per input line)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Literal


@dataclass
class Options:
    """Model and sampling options shared by `generate` and `chat`."""

    model: str
    """Model: a Hugging Face folder, a .gguf file, a hub id, or a local alias (smollm2-135m-instruct)."""
    system: str | None = None
    """System message (with the chat template)."""
    max_new_tokens: int = 128
    """Stop after this many new tokens."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = no limit)."""
    repetition_penalty: float = 1.0
    """Penalty (> 1) on tokens already in the prompt or the reply."""
    seed: int | None = None
    """Random seed: the same seed gives the same text."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the model."""
    device: str = "cpu"
    """Device to run on (cpu, cuda, cuda:1, ...)."""
    allow_pickle: bool = False
    """Allow loading pickle (.bin/.pt) checkpoints; only for files you trust."""

    def validate(self) -> None:
        self.sampling().validate()  # RequestError is a ValueError naming the field and value

    def sampling(self, seed_offset: int = 0):
        from ..inference.sampling import SamplingParams

        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                              seed=None if self.seed is None else self.seed + seed_offset)


@dataclass
class Config(Options):
    prompt: str | None = None
    """Prompt text; read from standard input when omitted."""
    chat: bool = False
    """Wrap the prompt as a user message with the model's chat template."""


def main(cfg: Config) -> int:
    import torch

    from ..inference.engine import Engine
    from ..models.loading import load
    from ..tokenizer.chat import encode_chat

    prompt = cfg.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print("error: give --prompt TEXT or pipe the prompt on standard input", file=sys.stderr)
            return 2
        prompt = sys.stdin.read()
    model, tok = load(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, allow_pickle=cfg.allow_pickle)
    if tok is None:
        print(f"error: {cfg.model} has no tokenizer.json; generation needs one", file=sys.stderr)
        return 2
    if model.cfg.head == "classifier":
        return _classify(Engine(model, tok), tok, prompt if cfg.prompt is not None else prompt.splitlines())
    if model.cfg.head != "lm":
        print(f"error: {cfg.model} has a {model.cfg.head!r} head; generate needs a causal LM or a classifier",
              file=sys.stderr)
        return 2
    if cfg.chat:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
            {"role": "user", "content": prompt}]
        ids = encode_chat(tok, messages, add_generation_prompt=True).ids
    else:
        ids = tok.encode(prompt)
    engine = Engine(model, tok)
    engine.add_request(ids, cfg.sampling())
    start, n = time.perf_counter(), 0
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.text)
            sys.stdout.flush()
            n = out.completion_tokens
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{n} tokens in {elapsed:.2f}s, {n / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _classify(engine, tok, texts: str | list[str]) -> int:
    """Print {"input", "output", "scores"} per text: the predicted label and its softmax probabilities (or the
    value of a regression head), framed and tokenized as classification fine-tuning does."""
    import json

    from ..data.classify import ClassifyExample, tokenize_examples

    texts = [texts] if isinstance(texts, str) else [t for t in texts if t.strip()]
    examples = [ClassifyExample(where="input", text=t, text_pair=None, label=0) for t in texts]
    tokenized, _ = tokenize_examples(examples, tok, engine.max_context)
    logits = engine.classify([t.input_ids for t in tokenized])  # (B, K)
    names = engine.model.cfg.id2label or {i: str(i) for i in range(logits.shape[-1])}
    for text, row in zip(texts, logits):
        if row.numel() == 1:
            out = {"input": text, "output": row.item()}
        else:
            probs = row.softmax(-1)
            out = {"input": text, "output": names[int(probs.argmax())],
                   "scores": {names[i]: round(p, 4) for i, p in enumerate(probs.tolist())}}
        print(json.dumps(out))
    return 0

