"""Evaluation tasks by name, and the built-in offline ones that build their examples at run time from real data on
every machine (the Python standard library) rather than from shipped copies.

A task spec is a string: `stdlib-mc` (docstring -> which function, 4 choices), `stdlib-ppl` (perplexity and bits
per byte of held-out standard-library modules), `humaneval` (pass@k in the sandbox), `mc:PATH` (a multiple-choice
file in HellaSwag / MMLU / ARC format), `ppl:PATH` (text files, folders, or JSONL/Parquet records with `text`).
"""

from __future__ import annotations

import importlib
import inspect
import lzma
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STDLIB_MC_MODULES = ("json", "os.path", "textwrap", "string", "shutil", "base64", "inspect", "difflib",
                     "statistics", "calendar", "glob", "fnmatch")


def stdlib_docstring_items(n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """MMLU-format questions from real docstrings: "Which Python function does this docstring describe?" with the
    function's name and 3 other names of the same modules as choices (the name is masked in its docstring)."""
    funcs = []
    for mod_name in STDLIB_MC_MODULES:
        mod = importlib.import_module(mod_name)
        names = [k for k, v in vars(mod).items() if not k.startswith("_") and inspect.isfunction(v)
                 and v.__module__ == mod.__name__ and inspect.getdoc(v)]
        for k in sorted(names):
            doc = inspect.getdoc(vars(mod)[k]).split("\n\n")[0].replace("\n", " ").replace(k, "___")
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


def stdlib_heldout_texts(n: int = 20, fraction: float = 0.05) -> list[tuple[str, str]]:
    """(name, source) of standard-library modules in a fixed held-out slice: the files whose name `in_fraction`
    puts in `fraction` (stable across machines with the same Python), at most n, in name order."""
    from ..data.readers import in_fraction

    root = Path(sysconfig.get_paths()["stdlib"])
    picked = [p for p in sorted(root.glob("*.py")) if in_fraction(p.name, fraction)][:n]
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in picked]


def xz_bits_per_byte(texts: list[str]) -> float:
    """`xz -9`'s bits per byte on the same texts (each compressed on its own), the classic baseline a language
    model's bits per byte should beat."""
    total = sum(len(t.encode("utf-8")) for t in texts)
    return 8 * sum(len(lzma.compress(t.encode("utf-8"), preset=9)) for t in texts) / max(1, total)


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
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: {{question.strip()}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        f'doc_to_target: "{{{{answer}}}}"\nmetric_list:\n{metrics}metadata:\n  version: 1.0\n')
    return data


@dataclass
class TaskSpec:
    """A parsed task string: its kind and, for file tasks, the path."""

    name: str
    kind: str  # multiple_choice | perplexity | humaneval
    path: str | None = None


def parse_task(spec: str) -> TaskSpec:
    """`stdlib-mc`, `stdlib-ppl`, `humaneval`, `mc:PATH`, `ppl:PATH` -> TaskSpec; anything else is a ValueError."""
    builtin = {"stdlib-mc": "multiple_choice", "stdlib-ppl": "perplexity", "humaneval": "humaneval"}
    if spec in builtin:
        return TaskSpec(spec, builtin[spec])
    kind, _, path = spec.partition(":")
    if kind in ("mc", "ppl") and path:
        if not Path(path).exists():
            raise FileNotFoundError(f"task {spec!r}: {path} not found")
        return TaskSpec(spec, "multiple_choice" if kind == "mc" else "perplexity", path)
    raise ValueError(f"unknown task {spec!r}: expected one of {sorted(builtin)}, mc:PATH or ppl:PATH")
