"""Perplexity filtering: score each document by a language model's bits per byte and drop the improbable ones, as
CCNet (Wenzek et al. 2020, "CCNet: Extracting High Quality Monolingual Datasets from Web Crawl Data") does with a
KenLM model: gibberish, mojibake, encoded blobs and keyword spam score far above real prose.

bits per byte = Σ token NLL (nats) / (ln 2 · UTF-8 bytes) over the first `max_tokens` tokens of the document (each
token conditioned on BOS, or EOS when the tokenizer has no BOS, then on the tokens before it, as lm-eval's rolling
log-likelihood), the bytes being those of the scored prefix; per byte, so it compares across tokenizers and is
the `bits_per_byte` of `lmforge evaluate`'s perplexity tasks. The model runs its own forward
(`models.transformer`), batched under torch.no_grad, on the CPU with the threads torch has.

Two steps share the scorer: `perplexity` (a Filter: an absolute `max_bits_per_byte` threshold) and
`perplexity_buckets` (a CorpusStep: CCNet's head / middle / tail buckets cut at corpus quantiles of the score, which
needs every document's score before any is removed). Both add `meta["bits_per_byte"]`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np

from .base import Doc, Verdict

__all__ = ["PerplexityConfig", "PerplexityBucketsConfig", "Perplexity", "PerplexityBuckets", "Scorer", "BUCKETS"]

BUCKETS = ("head", "middle", "tail")
"""CCNet's buckets, from the lowest perplexity (most like the model's training text) to the highest."""
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PerplexityConfig:
    """Score documents by a language model's bits per byte; remove those above a threshold."""

    model: str = "smollm2-135m-instruct"
    """Scoring model: a Hugging Face folder, a .gguf file, an adapter folder or an alias (smollm2-135m-instruct)."""
    max_tokens: int = 512
    """Tokens scored per document, from its beginning (at most the model's context - 1)."""
    batch_size: int = 8
    """Documents per forward pass."""
    dtype: str = "float32"
    """Weights' dtype: float32, bfloat16 or float16 (the log-probabilities are computed in float32)."""
    device: str = "cpu"
    """Torch device; on the CPU the forward uses the threads torch has (torch.set_num_threads)."""
    max_bits_per_byte: float | None = None
    """Remove documents above this many bits per byte (reason max_bits_per_byte); None: only score them."""

    def validate(self) -> None:
        if not str(self.model).strip():
            raise ValueError("model: give a model folder, a .gguf file or an alias such as smollm2-135m-instruct")
        if self.max_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"max_tokens and batch_size must be >= 1, found {self.max_tokens}, {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, found {self.dtype!r}")
        if self.max_bits_per_byte is not None and not self.max_bits_per_byte > 0:
            raise ValueError(f"max_bits_per_byte must be > 0 (or null), found {self.max_bits_per_byte}")


@dataclass
class PerplexityBucketsConfig(PerplexityConfig):
    """Score documents by a language model's bits per byte; keep CCNet buckets cut at corpus quantiles."""

    buckets: list[str] = field(default_factory=lambda: ["head", "middle"])
    """Buckets to keep, of head (lowest bits per byte), middle and tail; CCNet's quality split keeps head, middle."""
    cut_points: list[float] = field(default_factory=lambda: [1 / 3, 2 / 3])
    """Quantiles of the score between head | middle and middle | tail (CCNet: the 33rd and 66th percentiles)."""
    per: str | None = None
    """Cut within each value of this meta field (CCNet cuts per language: `language`); None: one cut."""

    def validate(self) -> None:
        super().validate()
        bad = [b for b in self.buckets if b not in BUCKETS]
        if bad or not self.buckets or len(set(self.buckets)) != len(self.buckets):
            raise ValueError(f"buckets must be distinct names of {', '.join(BUCKETS)}, found {self.buckets}")
        c = list(self.cut_points)
        if len(c) != 2 or not 0 <= c[0] <= c[1] <= 1:
            raise ValueError(f"cut_points must be two quantiles 0 <= q1 <= q2 <= 1, found {self.cut_points}")


class Scorer:
    """Bits per byte of texts under a causal language model (loaded once per worker process)."""

    def __init__(self, cfg: PerplexityConfig):
        import torch
        from tokenizers import Tokenizer as Backend

        from ..transforms.peft import load

        cfg.validate()
        self.torch = torch
        model, tok = load(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device)
        if tok is None:
            raise ValueError(f"{cfg.model}: the model has no tokenizer (tokenizer.json); perplexity needs one")
        if model.cfg.head != "lm" or not model.cfg.causal:
            raise ValueError(f"{cfg.model}: perplexity needs a causal language model, found a {model.cfg.family} "
                             f"model with a {model.cfg.head!r} head (causal={model.cfg.causal})")
        self.prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if self.prefix is None:
            raise ValueError(f"{cfg.model}: the tokenizer has neither a BOS nor an EOS token to condition the first "
                             f"token on")
        self.model = model.eval()
        self.max_tokens = min(cfg.max_tokens, model.cfg.max_position_embeddings - 1)
        self.batch_size = cfg.batch_size
        self.backend = Backend.from_str(tok.backend.to_str())  # a copy: special-token text is text, as in `prepare`
        self.backend.encode_special_tokens = True
        self.backend.no_padding()
        self.backend.no_truncation()
        self.scored = {"tokens_scored": 0, "bytes_scored": 0}
        """What the last call scored (a step's `extra()` counters)."""

    def _prefix(self, text: str) -> tuple[list[int], int]:
        """(the token ids scored, UTF-8 bytes of the text they cover) for one document."""
        enc = self.backend.encode(text, add_special_tokens=False)
        ids = enc.ids
        if len(ids) <= self.max_tokens:
            return ids, len(text.encode("utf-8", "surrogatepass"))
        end = enc.offsets[self.max_tokens - 1][1]  # character offset just after the last scored token
        return ids[:self.max_tokens], len(text[:end].encode("utf-8", "surrogatepass"))

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts),) float64 bits per byte; an empty text scores 0."""
        torch = self.torch
        F = torch.nn.functional
        docs = [self._prefix(t) for t in texts]
        nll = np.zeros(len(texts), np.float64)  # nats per document
        order = sorted(range(len(docs)), key=lambda i: -len(docs[i][0]))  # similar lengths share a batch
        device = self.model.device
        with torch.no_grad():
            for b in range(0, len(order), self.batch_size):
                rows = [i for i in order[b:b + self.batch_size] if docs[i][0]]
                if not rows:
                    continue
                lengths = torch.tensor([len(docs[i][0]) for i in rows], device=device)  # (B,)
                x = torch.full((len(rows), int(lengths.max()) + 1), self.prefix, dtype=torch.long)  # (B, T + 1)
                for r, i in enumerate(rows):
                    x[r, 1:len(docs[i][0]) + 1] = torch.tensor(docs[i][0])
                x = x.to(device)
                # right padding: a real position never attends to the padding after it (causal); no logits here
                h = self.model(x[:, :-1], logits_to_keep=torch.empty(0, dtype=torch.long, device=device)).hidden
                real = torch.arange(x.shape[1] - 1, device=device)[None, :] < lengths[:, None]  # (B, T)
                hs, targets = h[real], x[:, 1:][real]  # (N, C), (N,) real positions, row-major
                owner = torch.arange(len(rows), device=device).repeat_interleave(lengths)  # (N,) row of each
                sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
                for a in range(0, len(targets), 2048):  # (2048, V) logits at a time, never (B, T, V)
                    logits = self.model.project(hs[a:a + 2048]).float()
                    loss = F.cross_entropy(logits, targets[a:a + 2048], reduction="none")
                    sums.index_add_(0, owner[a:a + 2048], loss.double())
                nll[rows] = sums.cpu().numpy()
        n_bytes = np.array([n for _, n in docs], np.float64)
        self.scored = {"tokens_scored": sum(len(ids) for ids, _ in docs), "bytes_scored": int(n_bytes.sum())}
        return np.divide(nll, math.log(2) * n_bytes, out=np.zeros_like(nll), where=n_bytes > 0)


class Perplexity:
    """A Filter: `meta["bits_per_byte"]` for every document; above `max_bits_per_byte` it is removed as
    `perplexity:max_bits_per_byte`."""

    name = "perplexity"

    def __init__(self, cfg: PerplexityConfig):
        self.cfg = cfg
        self.score = Scorer(cfg)

    def __call__(self, docs: list[Doc]) -> list[Verdict]:
        scores = self.score([d.text for d in docs])
        limit = self.cfg.max_bits_per_byte
        out: list[Verdict] = []
        for d, s in zip(docs, scores.tolist()):
            d.meta["bits_per_byte"] = s
            out.append(f"{self.name}:max_bits_per_byte" if limit is not None and s > limit else None)
        return out

    def extra(self) -> dict[str, int]:
        """Tokens and bytes scored in the partition (the scored beginnings of the documents)."""
        return dict(self.score.scored)


class PerplexityBuckets:
    """A CorpusStep: keys are each document's bits per byte (its float64 bits as uint64) and a hash of its `per`
    group; `duplicates` cuts each group at the `cut_points` quantiles into head / middle / tail (a score equal to a
    cut point goes to the lower bucket) and removes the documents outside `buckets` as `perplexity_buckets:tail`
    (etc.), and those above `max_bits_per_byte` as `perplexity_buckets:max_bits_per_byte`."""

    name = "perplexity_buckets"

    def __init__(self, cfg: PerplexityBucketsConfig):
        cfg.validate()
        self.cfg = cfg
        self._score: Scorer | None = None  # loaded on first use: `duplicates` runs in the driver and needs no model

    def keys(self, docs: list[Doc]) -> np.ndarray:
        if self._score is None:
            self._score = Scorer(self.cfg)
        scores = self._score([d.text for d in docs])
        out = np.empty((len(docs), 2), np.uint64)  # [n, 2]: score bits, group hash
        out[:, 0] = scores.astype(np.float64).view(np.uint64)
        for i, (d, s) in enumerate(zip(docs, scores.tolist())):
            d.meta["bits_per_byte"] = s
            group = "" if self.cfg.per is None else str(d.meta.get(self.cfg.per, ""))
            out[i, 1] = int.from_bytes(hashlib.blake2b(group.encode("utf-8", "surrogatepass"), digest_size=8)
                                       .digest(), "little")
        return out

    def duplicates(self, doc_keys: list[str], keys: np.ndarray) -> dict[str, tuple[str, str]]:
        if not len(doc_keys):
            return {}
        scores = np.ascontiguousarray(keys[:, 0]).view(np.float64)  # (N,)
        bucket = np.zeros(len(doc_keys), np.int64)  # (N,) 0 head, 1 middle, 2 tail
        groups = keys[:, 1] if keys.shape[1] > 1 else np.zeros(len(doc_keys), np.uint64)
        for g in np.unique(groups):
            at = np.flatnonzero(groups == g)
            cuts = np.quantile(scores[at], self.cfg.cut_points)  # (2,) linear interpolation, numpy's default
            bucket[at] = np.searchsorted(cuts, scores[at], side="left")
        keep = np.isin(bucket, [BUCKETS.index(b) for b in self.cfg.buckets])
        limit = self.cfg.max_bits_per_byte
        out: dict[str, tuple[str, str]] = {}
        for key, k, b, s in zip(doc_keys, keep.tolist(), bucket.tolist(), scores.tolist()):
            if limit is not None and s > limit:
                out[key] = (f"{self.name}:max_bits_per_byte", "")
            elif not k:
                out[key] = (f"{self.name}:{BUCKETS[b]}", "")
        return out
