"""Generation tasks scored by exact match after extraction (GSM8K and files in its format, or plain prompt/target
records), run batched on the inference engine, with lm-evaluation-harness's prompts, stop sequences, regex filter
and exact-match normalisation so the numbers match `lm_eval --model hf` on the same file.

Formats (detected from the first record's fields):
- GSM8K (`question`, `answer` ending in "#### 42"): prompt "Question: {question}\\nAnswer:", few-shot example
  prompt + " " + answer, stop at "Question:", "</s>", "<|im_end|>"; the answer is the first match of
  `#### (-?[0-9.,]+)` (lm-eval's strict-match), compared after removing ",", "$", everything up to "#### " and a
  final "." on both sides, ignoring case.
- prompt / target (`prompt`, `target`): the prompt verbatim, few-shot example prompt + target, stop at "\\n\\n",
  the whole generation compared with the target.
"""

from __future__ import annotations

import os
import random
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..data.readers import DataError, iter_records
from ..inference.sampling import SamplingParams
from ..tokenizer.base import Tokenizer
from .metrics import mean_stderr
from .multiple_choice import encode_text, fewshot_prefix
from .qa import f1 as token_f1

__all__ = ["GenItem", "GenSpec", "GSM8K", "PROMPT_TARGET", "read_generation", "extract", "normalize",
           "evaluate_generation"]


@dataclass
class GenItem:
    """One generation example, already in prompt form."""

    prompt: str
    """The prompt of this item alone (lm-eval's doc_to_text)."""
    target: str
    """The reference answer, before normalisation (doc_to_target)."""
    shot: str
    """The item written out with its answer, as a few-shot example."""
    source: str = ""
    """Where the item was read (``file:line``)."""


@dataclass
class GenSpec:
    """How a generation task stops, extracts its answer and compares it (lm-eval's generation_kwargs, filter and
    exact_match options)."""

    until: list[str] = field(default_factory=lambda: ["\n\n"])
    """Stop sequences; the generation is cut before the first one (the EOS token always stops too)."""
    regex: str | None = None
    """Answer extraction: the first match's first non-empty group, stripped (no match: `fallback`); None = the
    whole generation."""
    regexes_to_ignore: list[str] = field(default_factory=list)
    """Patterns removed from prediction and target before comparing."""
    ignore_case: bool = False
    """Compare lower-cased."""
    ignore_punctuation: bool = False
    """Compare without ASCII punctuation."""
    fallback: str = "[invalid]"
    """The extracted answer when the regex does not match."""


GSM8K = GenSpec(until=["Question:", "</s>", "<|im_end|>"], regex=r"#### (\-?[0-9\.\,]+)",
                regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"], ignore_case=True)
PROMPT_TARGET = GenSpec()


def _field(rec: dict[str, Any], key: str, where: str, fmt: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        found = "missing" if key not in rec or value is None else f"{type(value).__name__} {value!r:.60}"
        raise DataError(f"{where}: field {key!r} of a {fmt} record must be a non-empty string, found {found} "
                        f"(fields {sorted(rec)})")
    return value


def parse_generation(rec: dict[str, Any], where: str) -> tuple[GenItem, str]:
    """(item, format) of one record: GSM8K (question, answer) or prompt / target."""
    if "question" in rec and "answer" in rec:
        question, answer = _field(rec, "question", where, "gsm8k"), _field(rec, "answer", where, "gsm8k")
        prompt = f"Question: {question}\nAnswer:"
        return GenItem(prompt, answer, f"{prompt} {answer}", where), "gsm8k"
    if "prompt" in rec:
        prompt, target = _field(rec, "prompt", where, "prompt/target"), _field(rec, "target", where, "prompt/target")
        return GenItem(prompt, target, prompt + target, where), "prompt_target"
    raise DataError(f"{where}: cannot tell the generation format from fields {sorted(rec)}; expected GSM8K "
                    "(question, answer with '#### ANSWER') or prompt/target (prompt, target)")


def read_generation(path: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[list[GenItem], GenSpec]:
    """Every record of JSONL / Parquet / CSV file(s) and the spec of their format; a bad record or a mix of
    formats raises DataError naming file and line."""
    items, fmt = [], None
    for where, rec in iter_records(path):
        item, f = parse_generation(rec, where)
        if fmt is not None and f != fmt:
            raise DataError(f"{where}: a {f} record in a {fmt} file; expected every record in one format")
        items.append(item)
        fmt = f
    return items, replace(GSM8K if fmt == "gsm8k" else PROMPT_TARGET)


def extract(text: str, spec: GenSpec) -> str:
    """lm-eval's regex filter + take_first: the first match's first non-empty group, stripped, else the fallback."""
    if spec.regex is None:
        return text
    matches = re.findall(spec.regex, text)
    if not matches:
        return spec.fallback
    match = matches[0]
    if isinstance(match, tuple):
        match = next((m for m in match if m), spec.fallback)
    return match.strip()


def normalize(text: str, spec: GenSpec) -> str:
    """lm-eval's exact_match preprocessing: remove each ignored pattern, then lower-case / drop punctuation."""
    for pattern in spec.regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if spec.ignore_case:
        text = text.lower()
    if spec.ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def _prompt_ids(tokenizer: Tokenizer, context: str, chat: bool) -> list[int]:
    if not chat:
        return encode_text(tokenizer, context)
    from ..tokenizer.chat import encode_chat

    return encode_chat(tokenizer, [{"role": "user", "content": context}], add_generation_prompt=True).ids


def evaluate_generation(engine, tokenizer: Tokenizer, items: Sequence[GenItem], spec: GenSpec,
                        num_fewshot: int = 0, max_new_tokens: int = 256, limit: int | None = None, seed: int = 1234,
                        chat: bool = False, description: str = "") -> dict[str, Any]:
    """Generate greedily for every item (one batched engine call), extract and compare: exact_match and the SQuAD
    token F1 of the extracted answer against the target (official normalisation), each with its standard error,
    the share of answers the regex could not find, the exact prompts and outputs of the first 3
    items and each item's generation.

    Plain prompts are description + few-shot examples + prompt, left-truncated to the context minus
    `max_new_tokens` as lm-eval does; with `chat` that text is the user message of the model's chat template."""
    if not items:
        raise ValueError("no generation items to evaluate")
    rnd = random.Random(seed)
    shots = [it.shot for it in items] if num_fewshot else []
    evaluated = items[:limit] if limit is not None else items
    contexts = [description + fewshot_prefix(shots, i, num_fewshot, rnd) + it.prompt for i, it in enumerate(evaluated)]
    room = engine.max_context - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of "
                         f"{engine.max_context} tokens")
    prompts = [_prompt_ids(tokenizer, c, chat)[-room:] for c in contexts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=tuple(s for s in spec.until if s))
    outputs = engine.generate(prompts, params)
    hits, f1s, per_item = [], [], []
    for item, out in zip(evaluated, outputs):
        answer = extract(out.text, spec)
        hit = normalize(answer, spec) == normalize(item.target, spec)
        hits.append(1.0 if hit else 0.0)
        f1s.append(token_f1(answer, [item.target]))
        per_item.append({"source": item.source, "generation": out.text, "extracted": answer, "target": item.target,
                         "exact_match": hit, "f1": f1s[-1]})
    em, stderr = mean_stderr(hits)
    f1, f1_stderr = mean_stderr(f1s)
    return {"n": len(hits), "num_fewshot": num_fewshot, "chat": chat, "exact_match": em,
            "exact_match_stderr": stderr if len(hits) > 1 else float("nan"), "f1": f1,
            "f1_stderr": f1_stderr if len(hits) > 1 else float("nan"),
            "invalid": sum(p["extracted"] == spec.fallback for p in per_item) / len(per_item) if spec.regex else 0.0,
            "until": spec.until, "regex": spec.regex,
            "examples": [{"context": c, **p} for c, p in zip(contexts[:3], per_item[:3])], "per_item": per_item}
