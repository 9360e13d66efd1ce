"""Generation from an exported ONNX folder (`lmforge.models.onnx.export_onnx`) with ONNX Runtime, without torch:
numpy, onnxruntime and the `tokenizers`-backed lmforge Tokenizer only, so a deployment needs none of PyTorch.

The graph takes past keys/values and returns presents; the runner feeds each step's presents back as the next
step's past (prefill with P = 0, then one token per step). Sampling follows `inference.sampling` (temperature,
then top-k (Fan et al. 2018), then top-p keeping the token that crosses it (Holtzman et al. 2020); the CTRL
repetition penalty (Keskar et al. 2019)) with a numpy generator, so a seed repeats a text here but draws differ
from the torch engine's.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..tokenizer import Tokenizer, encode_chat

__all__ = ["OnnxGenerator", "Piece", "check_sampling", "choose", "decode_speed", "distribution"]

_META_FILE = "lmforge_onnx.json"
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Piece:
    """One generated token and the text that became final with it ('' while a character is incomplete)."""

    token_id: int
    text: str


class OnnxGenerator:
    """An ONNX Runtime session over an exported folder, generating one sequence at a time with a KV cache."""

    def __init__(self, path: str | Path, threads: int | None = 2,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        """`threads`: ONNX Runtime's intra-op threads (None: its default, one per physical core)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("the onnxruntime backend needs ONNX Runtime: pip install 'lmforge[onnx]'") from None
        self.path = Path(path)
        meta_file = self.path / _META_FILE
        if not meta_file.is_file():
            raise InputError(f"{self.path}: no {_META_FILE}; expected a folder written by lmforge's export_onnx")
        self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if self.meta.get("dtype") not in _NP_DTYPES:
            raise InputError(f"{meta_file}: dtype {self.meta.get('dtype')!r}; expected one of {sorted(_NP_DTYPES)}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, found {threads}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads or 0, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path / self.meta["model_file"]), opts, providers=list(providers))
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.kv_dtype = _NP_DTYPES[self.meta["dtype"]]
        self.past_names = self.meta["inputs"][3:]  # past_key_values.{i}.key/value, in the outputs' order
        self.eos = frozenset(self.meta["eos_token_ids"])
        self.max_context = int(self.meta["max_context"])

    # ---- text
    def prompt_ids(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a plain prompt, or of a user message (after an optional system one) with the chat
        template and the assistant's generation prompt."""
        if not chat:
            return self.tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return encode_chat(self.tokenizer, messages, add_generation_prompt=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    # ---- the model
    def forward(self, ids: np.ndarray, positions: np.ndarray, past: list[np.ndarray]
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: ids and positions (B, T), past (B, K, P, D) per layer's key and value ->
        (logits (B, T, V) float32, presents (B, K, P + T, D))."""
        total = positions.shape[1] + (past[0].shape[2] if past else 0)
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((ids.shape[0], total), np.int64),
                "position_ids": positions.astype(np.int64), **dict(zip(self.past_names, past))}
        logits, *present = self.session.run(None, feed)
        return logits, present

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.meta["num_kv_heads"], 0, self.meta["head_dim"])
        return [np.zeros(shape, self.kv_dtype) for _ in self.past_names]

    # ---- generation
    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 128, *, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop_token_ids: Sequence[int] = (), ignore_eos: bool = False) -> Iterator[int]:
        """Yield new token ids one by one: greedy at temperature 0, else sampled with top-k / top-p and a numpy
        generator seeded with `seed`. Stops after max_new_tokens, at the context length, or after an
        end-of-sequence / stop token (which is yielded), unless ignore_eos."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        check_sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        if not ids:
            raise InputError("the prompt is empty; expected at least one token")
        if len(ids) >= self.max_context:
            raise InputError(f"the prompt has {len(ids)} tokens; expected fewer than the context {self.max_context}")
        vocab = self.meta["vocab_size"]
        if min(ids) < 0 or max(ids) >= vocab:
            raise InputError(f"prompt token ids must be in [0, {vocab}), found {min(ids)}..{max(ids)}")
        rng = np.random.default_rng(seed)
        stops = set(stop_token_ids) | (set() if ignore_eos else set(self.eos))
        seen = set(ids)
        step_ids, pos, past = np.asarray([ids]), np.arange(len(ids))[None], self.empty_past()
        for n in range(max_new_tokens):
            logits, past = self.forward(step_ids, pos, past)
            row = logits[0, -1].astype(np.float64)  # (V,)
            if repetition_penalty != 1.0:
                idx = np.fromiter(seen, np.int64)
                row[idx] = np.where(row[idx] > 0, row[idx] / repetition_penalty, row[idx] * repetition_penalty)
            token = choose(row, temperature, top_k, top_p, rng)
            yield token
            seen.add(token)
            end = past[0].shape[2] + 1
            if token in stops or n + 1 == max_new_tokens or end >= self.max_context:
                return
            step_ids, pos = np.asarray([[token]]), np.asarray([[end - 1]])

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, **sampling) -> list[int]:
        """All new token ids of `stream` (same arguments)."""
        return list(self.stream(prompt, max_new_tokens, **sampling))

    def stream_text(self, prompt: str | Sequence[int], max_new_tokens: int = 128, **sampling) -> Iterator[Piece]:
        """`stream` with the text each token completes (end-of-sequence tokens add none); only the tokens since
        the last complete character are decoded again, so a step costs the same however long the text is."""
        out: list[int] = []
        prefix = read = 0
        for token in self.stream(prompt, max_new_tokens, **sampling):
            out.append(token)
            text = ""
            if token not in self.eos:
                before, after = self.decode(out[prefix:read]), self.decode(out[prefix:])
                if len(after) > len(before) and not after.endswith("\ufffd"):
                    text, prefix, read = after[len(before):], read, len(out)
            yield Piece(token, text)


def decode_speed(gen: OnnxGenerator, ids: Sequence[int], new_tokens: int = 64, repeats: int = 2) -> float:
    """Greedy tokens per second of the runner after the prompt `ids` (prefill included), best of `repeats` after a
    4-token warm-up: what `eval.compression.decode_speed` times for lmforge's engine, so the two compare."""
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"new_tokens and repeats must be >= 1, found {new_tokens}, {repeats}")
    gen.generate(ids, 4, ignore_eos=True)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = len(gen.generate(ids, new_tokens, ignore_eos=True))
        best = max(best, n / (time.perf_counter() - start))
    return best


def distribution(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Probabilities (V,) that sampling draws from for one row of logits (V,): softmax(z / T) restricted to the
    top_k tokens, then to the smallest set whose mass reaches top_p (the token that crosses it kept)."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")  # ranks, most likely first
    ranked = z[order]
    if top_k:
        ranked[top_k:] = -np.inf
    p = np.exp(ranked - ranked[0])
    p /= p.sum()
    if top_p < 1:
        before = np.cumsum(p) - p  # mass of the tokens ranked above
        p[before >= top_p] = 0.0
        p /= p.sum()
    out = np.empty_like(p)
    out[order] = p
    return out


def choose(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """The next token from one row of logits (V,): the argmax at temperature 0, else a draw from `distribution`."""
    if temperature == 0:
        return int(np.argmax(logits))
    p = distribution(logits, temperature, top_k, top_p)
    return int(rng.choice(len(p), p=p))


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, penalty: float) -> None:
    """ValueError naming the first sampling setting out of range (what the engine's SamplingParams checks, no torch)."""
    checks = [(max_new_tokens >= 1, "max_new_tokens must be >= 1", max_new_tokens),
              (temperature >= 0 and math.isfinite(temperature), "temperature must be >= 0", temperature),
              (0 < top_p <= 1, "top_p must be in (0, 1]", top_p), (top_k >= 0, "top_k must be >= 0", top_k),
              (penalty > 0, "repetition_penalty must be > 0", penalty)]
    for ok, message, found in checks:
        if not ok:
            raise ValueError(f"{message}, found {found}")
