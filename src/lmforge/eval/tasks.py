"""Evaluation tasks by name, and the built-in offline ones that build their examples at run time from real data on
every machine (the Python standard library) rather than from shipped copies.

A task spec is a string: `stdlib-mc` (docstring -> which function, 4 choices), `stdlib-ppl` (perplexity and bits
per byte of held-out standard-library modules), `stdlib-doctest` (predict the interpreter's output of a docstring
example, exact match), `stdlib-doc` ("What does `module.name` do?" for functions of held-out modules, answered in
words: token F1 and exact match against the docstring's summary), `humaneval` (pass@k in the sandbox), `mc:PATH`
(a multiple-choice file in HellaSwag / MMLU / ARC format), `ppl:PATH` (text files, folders, or JSONL/Parquet
records with `text`), `gen:PATH` (GSM8K or prompt/target records, exact match and token F1), `cls:PATH`
(`{"text", "label"}` records for a classifier model), `judge:PATH` (prompts answered by the model and a baseline,
compared by a judge model), `qa:PATH` (SQuAD v1.1 / v2.0 JSON or JSONL question-answering records for a span
model: exact match and F1).
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any

def xz_bits_per_byte(texts: list[str], per_document: bool = False) -> float:
    """Bits per byte of `xz -9e` compression of the same texts, the classic baseline a language model's bits per
    byte should beat: one raw LZMA2 stream (preset 9 | extreme, no .xz container) over the texts concatenated,
    so only information is counted, not the container's fixed header, index and footer (about 60 bytes a file:
    on short documents compressed one by one those dominate). `per_document=True`: each text as its own raw stream
    (no context shared across documents, as the model scores them), summed."""
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    data = [t.encode("utf-8") for t in texts]
    total = sum(len(d) for d in data)
    if per_document:
        packed = sum(len(lzma.compress(d, format=lzma.FORMAT_RAW, filters=filters)) for d in data if d)
    else:
        packed = len(lzma.compress(b"".join(data), format=lzma.FORMAT_RAW, filters=filters)) if total else 0
    return 8 * packed / max(1, total)


def write_lm_eval_task(folder: str | Path, items: list[dict[str, Any]], name: str) -> Path:
    """Write MMLU-format `items` as JSONL plus an lm-evaluation-harness task YAML (its MMLU continuation template,
    acc and acc_norm) into `folder`, so `lm_eval --include_path folder --tasks name` scores the same questions as
    `lmforge evaluate --tasks mc:folder/name.jsonl`. Returns the data file."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in items))
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in ("acc", "acc_norm"))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\nfewshot_split: test\n"
        'doc_to_text: "Question: {{question.strip()}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        f'doc_to_target: "{{{{answer}}}}"\nmetric_list:\n{metrics}metadata:\n  version: 1.0\n')
    return data


def write_lm_eval_generation_task(folder: str | Path, records: list[dict[str, Any]], name: str,
                                  max_gen_toks: int = 256, until: list[str] | None = None) -> Path:
    """Write GSM8K or prompt/target `records` as JSONL plus an lm-evaluation-harness generate_until task YAML with
    the same prompt, stop sequences, regex filter and exact-match options as `lmforge evaluate --tasks
    gen:folder/name.jsonl` (GSM8K: lm-eval's own gsm8k settings, strict-match). `fewshot_split: test` makes
    lm-eval draw few-shot examples from the same file without the evaluated item, as lmforge does (without it,
    lm-eval 0.4.13 may show an item, answer included, in its own prompt). Returns the data file."""
    import json

    import yaml

    from .generation import read_generation

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    _, spec = read_generation(data)
    gsm8k = "question" in records[0]
    metric = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
              "ignore_case": spec.ignore_case, "ignore_punctuation": spec.ignore_punctuation,
              "regexes_to_ignore": spec.regexes_to_ignore}
    task: dict[str, Any] = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "output_type": "generate_until", "test_split": "test", "fewshot_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:" if gsm8k else "{{prompt}}",
        "doc_to_target": "{{answer}}" if gsm8k else "{{target}}", "target_delimiter": " " if gsm8k else "",
        "generation_kwargs": {"until": until if until is not None else spec.until, "do_sample": False,
                              "temperature": 0.0, "max_gen_toks": max_gen_toks},
        "metric_list": [metric], "metadata": {"version": 1.0}}
    if spec.regex:
        task["filter_list"] = [{"name": "strict-match", "filter": [
            {"function": "regex", "regex_pattern": spec.regex}, {"function": "take_first"}]}]
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return data


@dataclass
class TaskSpec:
    """A parsed task string: its kind and, for file tasks, the path."""

    name: str
    kind: str  # multiple_choice | perplexity | generation | humaneval | classification | judge | qa
    path: str | None = None


BUILTIN_TASKS = {"stdlib-mc": "multiple_choice", "stdlib-ppl": "perplexity", "stdlib-doctest": "generation",
                 "stdlib-doc": "generation", "humaneval": "humaneval"}
FILE_TASKS = {"mc": "multiple_choice", "ppl": "perplexity", "gen": "generation", "cls": "classification",
              "judge": "judge", "qa": "qa"}


def parse_task(spec: str) -> TaskSpec:
    """A built-in name or PREFIX:PATH (mc, ppl, gen, cls, judge, qa) -> TaskSpec; anything else is a ValueError.
    PATH may use the readers' placeholders ({stdlib}, {pkg:NAME}, {align}, {qa})."""
    from ..data.readers import expand_placeholders

    if spec in BUILTIN_TASKS:
        return TaskSpec(spec, BUILTIN_TASKS[spec])
    kind, _, path = spec.partition(":")
    if kind in FILE_TASKS and path:
        path = expand_placeholders(path)
        if not Path(path).exists():
            raise FileNotFoundError(f"task {spec!r}: {path} not found")
        return TaskSpec(spec, FILE_TASKS[kind], path)
    raise ValueError(f"unknown task {spec!r}: expected one of {sorted(BUILTIN_TASKS)} or "
                     f"{', '.join(k + ':PATH' for k in FILE_TASKS)}")
