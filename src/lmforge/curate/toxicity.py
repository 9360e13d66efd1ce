"""Toxicity: remove documents with profane or abusive passages, scored by alt-profanity-check's shipped model (a
linear SVM over TF-IDF word features, calibrated to probabilities, trained on about 200k human-labelled short texts:
comments and tweets), offline and fast (megabytes of text a second on one core).

Long documents are scored per chunk and the document gets the highest chunk score. The model reads a text as one
L2-normalised TF-IDF vector, so a slur in a 5 000-word article is diluted to almost nothing: scored whole, the
article passes however abusive one of its paragraphs is. Chunks are paragraphs (blank-line separated), a long one cut
into runs of lines of up to `chunk_chars`; short paragraphs are not merged, as merging dilutes an abusive comment
into its neighbours just the same (measured: an insult paragraph among 20 docstrings is caught in 100% of documents
with paragraph chunks, 14% with paragraphs merged up to 500 characters). The maximum is the default aggregate (a
document is as toxic as its worst passage); `quantile` below 1 tolerates a few flagged chunks in long documents. The
price is short lines judged alone: "Kill the subprocess." scores 0.95 (0.07% of standard-library docstrings removed
at the 0.8 threshold).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Doc, Verdict

__all__ = ["ToxicityConfig", "Toxicity", "chunks"]

_IMPORT_HINT = "pip install 'lmforge[curate]'"
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
BACKENDS = ("profanity_check",)


@dataclass
class ToxicityConfig:
    """Toxicity filter (alt-profanity-check's linear model, per paragraph), offline."""

    threshold: float = 0.8
    """Remove a document whose score (the chunks' aggregate probability of profanity) is at least this."""
    backend: str = "profanity_check"
    """profanity_check: alt-profanity-check's shipped TF-IDF + calibrated linear SVM (the only backend)."""
    chunk_chars: int = 500
    """A paragraph longer than this is scored in runs of whole lines of up to this many characters."""
    quantile: float = 1.0
    """Aggregate of the chunk scores: 1.0 the maximum (default), e.g. 0.9 ignores the worst tenth of the chunks."""

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"toxicity.backend is {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"toxicity.threshold is {self.threshold}; expected a probability in [0, 1]")
        if self.chunk_chars < 1:
            raise ValueError(f"toxicity.chunk_chars is {self.chunk_chars}; expected at least 1")
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"toxicity.quantile is {self.quantile}; expected a value in (0, 1]")


def chunks(text: str, chunk_chars: int) -> list[str]:
    """`text` cut into its paragraphs (blank-line separated); a paragraph longer than `chunk_chars` is cut into runs
    of whole lines up to `chunk_chars` (a longer line at `chunk_chars`). Never empty for a non-blank text."""
    out: list[str] = []
    for para in _PARAGRAPH.split(text):
        para = para.strip()
        if len(para) <= chunk_chars:
            out += [para] if para else []
            continue
        run = ""
        for line in para.splitlines():
            line = line.strip()
            for piece in (line[i:i + chunk_chars] for i in range(0, len(line), chunk_chars)):
                if run and len(run) + 1 + len(piece) > chunk_chars:
                    out.append(run)
                    run = ""
                run = f"{run}\n{piece}" if run else piece
        out += [run] if run else []
    return out or [text]


class Toxicity:
    """A Filter: `meta["toxicity"]` is the document's score in [0, 1] (the `quantile` of its chunks' probabilities
    of profanity); at or above `threshold` the document is removed as `toxicity:above_threshold`."""

    name = "toxicity"

    def __init__(self, cfg: ToxicityConfig):
        cfg.validate()
        self.cfg = cfg
        try:
            from profanity_check import predict_prob
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"the toxicity step needs alt-profanity-check: {_IMPORT_HINT}") from e
        self._predict: Any = predict_prob

    def scores(self, texts: list[str]) -> np.ndarray:
        """[n] float: each text's score, its chunks scored in one call to the model."""
        per_doc = [chunks(t, self.cfg.chunk_chars) for t in texts]
        flat = [c for cs in per_doc for c in cs]
        if not flat:
            return np.zeros(0)
        probs = np.asarray(self._predict(flat), dtype=np.float64)  # [chunks]
        out = np.empty(len(texts))
        start = 0
        for i, cs in enumerate(per_doc):
            part = probs[start:start + len(cs)]
            start += len(cs)
            out[i] = part.max() if self.cfg.quantile >= 1.0 else np.quantile(part, self.cfg.quantile)
        return out

    def __call__(self, docs: list[Doc]) -> list[Verdict]:
        scores = self.scores([d.text for d in docs])
        out: list[Verdict] = []
        for d, s in zip(docs, scores.tolist()):
            d.meta["toxicity"] = round(s, 4)
            out.append("toxicity:above_threshold" if s >= self.cfg.threshold else None)
        return out

    def extra(self) -> dict[str, int]:
        return {}
