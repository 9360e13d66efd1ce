"""`lmforge generate`: text from a model, plain or through its chat template, streamed to the terminal; for a
classifier model, the label and class probabilities of each input (one JSON line per input line)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Literal


@dataclass
class Config:
    model: str
    """Model: a Hugging Face folder, a .gguf file, a hub id, or a local alias (smollm2-135m-instruct)."""
    prompt: str | None = None
    """Prompt text; read from standard input when omitted."""
    chat: bool = False
    """Wrap the prompt as a user message with the model's chat template."""
    system: str | None = None
    """System message (with --chat)."""
    max_new_tokens: int = 128
    """Stop after this many new tokens."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = no limit)."""
    seed: int | None = None
    """Random seed: the same seed gives the same text."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the model."""
    device: str = "cpu"
    """Device to run on (cpu, cuda, cuda:1, ...)."""
    allow_pickle: bool = False
    """Allow loading pickle (.bin/.pt) checkpoints; only for files you trust."""

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], found {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, found {self.max_new_tokens}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, found {self.top_k}")


def main(cfg: Config) -> int:
    import torch

    from ..inference.generate import SamplingParams, generate_stream
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
        return _classify(model, tok, prompt if cfg.prompt is not None else prompt.splitlines())
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
    stops = tuple(i for i in {tok.eos_id, *_as_list(model.cfg.eos_token_id)} if i is not None)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, seed=cfg.seed, stop_token_ids=stops)
    new: list[int] = []
    printed = ""
    start = time.perf_counter()
    for step in generate_stream(model, [ids], params):
        tok_id = step[0]
        if tok_id is None or tok_id in stops:
            break
        new.append(tok_id)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    elapsed = time.perf_counter() - start
    sys.stdout.write(tok.decode(new)[len(printed):] + "\n")
    print(f"[{len(new)} tokens in {elapsed:.2f}s, {len(new) / max(elapsed, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _classify(model, tok, texts: str | list[str]) -> int:
    """Print {"input", "output", "scores"} per text: the predicted label and its softmax probabilities (or the
    value of a regression head), framed and tokenized as classification fine-tuning does."""
    import json

    import torch

    from ..data.classify import ClassifyCollate, ClassifyExample, tokenize_examples

    texts = [texts] if isinstance(texts, str) else [t for t in texts if t.strip()]
    examples = [ClassifyExample(where="input", text=t, text_pair=None, label=0) for t in texts]
    tokenized, _ = tokenize_examples(examples, tok, model.cfg.max_position_embeddings)
    pad = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    batch = ClassifyCollate(pad)(tokenized)
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float()  # (B, K)
    names = model.cfg.id2label or {i: str(i) for i in range(logits.shape[-1])}
    for text, row in zip(texts, logits):
        if row.numel() == 1:
            out = {"input": text, "output": row.item()}
        else:
            probs = row.softmax(-1)
            out = {"input": text, "output": names[int(probs.argmax())],
                   "scores": {names[i]: round(p, 4) for i, p in enumerate(probs.tolist())}}
        print(json.dumps(out))
    return 0


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]
