"""Evaluation tasks by name, and the built-in offline ones that build their examples at run time from real data on
every machine (the Python standard library) rather than from shipped copies.

A task spec is a string: `stdlib-mc` (docstring -> which function, 4 choices), `stdlib-ppl` (perplexity and bits
per byte of held-out standard-library modules), `stdlib-doctest` (predict the interpreter's output of a docstring
example, exact match), `humaneval` (pass@k in the sandbox), `mc:PATH` (a multiple-choice file in HellaSwag / MMLU /
ARC format), `ppl:PATH` (text files, folders, or JSONL/Parquet records with `text`), `gen:PATH` (GSM8K or
prompt/target records, exact match), `cls:PATH` (`{"text", "label"}` records for a classifier model),
`judge:PATH` (prompts answered by the model and a baseline, compared by a judge model).
"""

from __future__ import annotations

import importlib
import lzma
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STDLIB_MC_MODULES = ("json", "os.path", "textwrap", "string", "shutil", "base64", "inspect", "difflib",
                     "statistics", "calendar", "glob", "fnmatch")


def stdlib_docstring_items(n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """MMLU-format questions from real docstrings: "Which Python function does this docstring describe?" with the
    function's name and 3 other names of the same modules as choices (the name is masked in its docstring).

    Functions are read from the modules' source files (top-level `def`s with a docstring), not from the live
    modules, whose contents can depend on what else was imported (torch replaces a function of `inspect`)."""
    import ast

    funcs = []
    for mod_name in STDLIB_MC_MODULES:
        source = Path(importlib.import_module(mod_name).__file__)  # os.path: posixpath or ntpath
        tree = ast.parse(source.read_text(encoding="utf-8"))
        docs = {node.name: ast.get_docstring(node) for node in tree.body
                if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node)}
        for k in sorted(docs):
            doc = docs[k].split("\n\n")[0].replace("\n", " ").replace(k, "___")
            funcs.append((mod_name, k, doc[:300]))
    rnd = random.Random(seed)
    rnd.shuffle(funcs)
    items = []
    for mod_name, name, doc in funcs[:n]:
        others = sorted({f[1] for f in funcs if f[1] != name})
        choices = rnd.sample(others, 3) + [name]
        rnd.shuffle(choices)
        items.append({"question": f"Which Python function does this docstring describe?\n{doc}",
                      "choices": choices, "answer": choices.index(name), "source": f"stdlib:{mod_name}.{name}"})
    return items


DOCTEST_MODULES = ("fractions", "collections", "heapq", "textwrap", "json", "typing", "enum", "difflib", "_pydecimal",
                   "statistics")  # a module before those importing it: a docstring counts once, under its home


def stdlib_doctest_items(n: int | None = None, seed: int = 0, context_examples: int = 8) -> list[dict[str, Any]]:
    """prompt/target records from the doctests of standard-library docstrings: the prompt is a header naming the
    docstring, its earlier examples (at most `context_examples`, the session state the example may need) and
    ">>> source\\n"; the target is the one-line output the interpreter printed. Shuffled with `seed`."""
    import doctest

    finder = doctest.DocTestFinder(recurse=True)
    records, seen = [], set()
    for mod_name in DOCTEST_MODULES:
        # module=False: _pydecimal names itself `decimal`, which may already be the C module in sys.modules, so
        # the finder's own module check would drop its objects; docstrings reached twice are skipped instead
        for test in sorted(finder.find(importlib.import_module(mod_name), mod_name, module=False),
                           key=lambda t: t.name):
            private = any(p.startswith("_") and not p.startswith("__") for p in test.name.split(".")[1:])
            if (test.filename, test.docstring) in seen or private:
                continue  # reached twice, or a private helper (which other packages may replace: typing_extensions)
            seen.add((test.filename, test.docstring))
            shown: list[str] = []
            for ex in test.examples:
                one_line = ex.source.count("\n") == 1 and ex.want.count("\n") == 1
                if one_line and "Traceback" not in ex.want and len(ex.want) <= 60 and not ex.options:
                    prompt = f"# {test.name}\n" + "".join(shown[-context_examples:]) + f">>> {ex.source}"
                    records.append({"prompt": prompt, "target": ex.want.rstrip("\n"),
                                    "source": f"stdlib:{test.name}:{ex.lineno}"})
                shown.append(">>> " + ex.source.replace("\n", "\n... ", ex.source.count("\n") - 1) + ex.want)
    random.Random(seed).shuffle(records)
    return records[:n]


def stdlib_doctest_gsm8k_items(n: int | None = None) -> list[dict[str, Any]]:
    """The numeric-output doctest examples as GSM8K records: question "What does the last line print?" + the
    transcript, answer a worked sentence ending in "#### N", so GSM8K's prompt, regex and normalisation apply."""
    numeric = [r for r in stdlib_doctest_items() if re.fullmatch(r"-?[0-9][0-9.,]*", r["target"])][:n]
    return [{"question": "What does the last line print?\n" + r["prompt"].rstrip("\n"),
             "answer": f"The interpreter prints {r['target']}.\n#### {r['target']}", "source": r["source"]}
            for r in numeric]


def stdlib_heldout_texts(n: int = 20, fraction: float = 0.05) -> list[tuple[str, str]]:
    """(name, source) of standard-library modules in a fixed held-out slice: the files whose name `in_fraction`
    puts in `fraction` (stable across machines with the same Python), at most n, in name order."""
    from ..splits import in_fraction

    root = Path(sysconfig.get_paths()["stdlib"])
    picked = [p for p in sorted(root.glob("*.py")) if in_fraction(p.name, fraction)][:n]
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in picked]


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
    kind: str  # multiple_choice | perplexity | generation | humaneval | classification | judge
    path: str | None = None


BUILTIN_TASKS = {"stdlib-mc": "multiple_choice", "stdlib-ppl": "perplexity", "stdlib-doctest": "generation",
                 "humaneval": "humaneval"}
FILE_TASKS = {"mc": "multiple_choice", "ppl": "perplexity", "gen": "generation", "cls": "classification",
              "judge": "judge"}


def parse_task(spec: str) -> TaskSpec:
    """A built-in name or PREFIX:PATH (mc, ppl, gen, cls, judge) -> TaskSpec; anything else is a ValueError."""
    if spec in BUILTIN_TASKS:
        return TaskSpec(spec, BUILTIN_TASKS[spec])
    kind, _, path = spec.partition(":")
    if kind in FILE_TASKS and path:
        if not Path(path).exists():
            raise FileNotFoundError(f"task {spec!r}: {path} not found")
        return TaskSpec(spec, FILE_TASKS[kind], path)
    raise ValueError(f"unknown task {spec!r}: expected one of {sorted(BUILTIN_TASKS)} or "
                     f"{', '.join(k + ':PATH' for k in FILE_TASKS)}")
