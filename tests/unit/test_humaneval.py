"""HumanEval: pass@k estimator, problem loading, canonical solutions pass in the sandbox, end-to-end evaluation."""

from __future__ import annotations

import gzip
import json
import math

import pytest

from lmforge.data.code_problems import code_test, extract_code, load_problems
from lmforge.eval.humaneval import evaluate_humaneval, truncate
from lmforge.eval.metrics import mean_stderr, pass_at_k
from lmforge.sandbox import run_many


def test_pass_at_k_matches_the_combinatorial_formula():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 5, 6) == 1.0 and pass_at_k(1, 1, 1) == 1.0
    assert pass_at_k(200, 13, 1) == pytest.approx(13 / 200)
    assert 0 < pass_at_k(10_000, 3, 100) < 1  # large n stays finite
    for bad in [(3, 1, 5), (3, 4, 1), (3, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_mean_stderr():
    assert mean_stderr([1.0]) == (1.0, 0.0)
    mean, se = mean_stderr([0, 1, 0, 1])
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 3 / 4))
    with pytest.raises(ValueError):
        mean_stderr([])


def test_truncate():
    body = "    return x + 1\n"
    assert truncate(body) == body
    assert truncate(body + "\ndef g():\n    pass\n") == body
    assert truncate(body + "\nif __name__ == '__main__':\n    f(1)") == body
    assert truncate(body + "\nprint(f(2))") == body
    assert truncate(body + "\n# test\nassert f(1) == 2") == body
    assert truncate(body + "\nclass A:\n    pass") == body
    assert truncate(body + "\n```\nThat is all.") == body
    assert truncate("```\n\nThe function returns x + 1.") == ""  # a fence right after the docstring: no body
    assert truncate("def g():\n    pass\n") == ""
    assert truncate("    if x:\n        return 1\n    # note\n    return 2\n") == \
        "    if x:\n        return 1\n    # note\n    return 2\n"  # indented lines are not stops


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("def f(): pass") == "def f(): pass"


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_load_problems(problems):
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert all(p["entry_point"] in p["prompt"] for p in problems)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_problems_errors(tmp_path, problems):
    good = problems[0]
    bad = dict(good)
    del bad["test"]
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'test'"):
        load_problems(_write(tmp_path / "bad.jsonl", [good, bad]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no problems"):
        load_problems(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        load_problems(tmp_path / "broken.jsonl")
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "missing.jsonl")
    with gzip.open(tmp_path / "one.jsonl.gz", "wt") as f:
        f.write(json.dumps(good) + "\n")
    assert load_problems(tmp_path / "one.jsonl.gz") == [good]


def _run_canonical(problems):
    return run_many([code_test(p, p["canonical_solution"]) for p in problems], workers=2)


def test_all_canonical_solutions_pass(problems):
    results = _run_canonical(problems)
    failed = [(p["task_id"], r.status, r.detail) for p, r in zip(problems, results) if r.status != "passed"]
    assert not failed


def test_wrong_solutions_fail(problems):
    wrong = []
    for p in problems[:20]:
        sol = p["canonical_solution"]
        if "return " in sol:
            wrong.append(code_test(p, sol.replace("return ", "return None and ", 1).replace(
                "return ", "return None and ")))
    results = run_many(wrong, workers=2)
    assert len(results) >= 15 and all(r.status == "failed" for r in results), [r.detail for r in results]
    # an off-by-one
    p = next(q for q in problems if q["entry_point"] == "strlen")
    assert run_many([code_test(p, p["canonical_solution"].replace("len(string)", "len(string) + 1"))])[0].status \
        == "failed"


def _end_to_end(smollm2, problems, max_new_tokens):
    from lmforge.inference.engine import Engine

    model, tokenizer = smollm2
    report = evaluate_humaneval(Engine(model, tokenizer), tokenizer, problems[:3], n=1, k=[1], temperature=0.0,
                                max_new_tokens=max_new_tokens)
    assert report["n"] == 1 and report["problems"] == 3 and set(report["pass@k"]) == {1}
    assert 0.0 <= report["pass@k"][1] <= 1.0 and report["stderr"][1] >= 0.0
    assert [p["task_id"] for p in report["per_problem"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(sum(p["statuses"].values()) == 1 and p["correct"] in (0, 1) for p in report["per_problem"])
    assert report["pass@k"][1] == sum(p["correct"] for p in report["per_problem"]) / 3
    assert sum(report["statuses"].values()) == 3
    ex = report["examples"][0]
    assert ex["prompt"] == problems[0]["prompt"] and ex["status"] in ("passed", "failed", "timeout", "memory",
                                                                      "refused")
    with pytest.raises(ValueError, match="greedy"):
        evaluate_humaneval(Engine(model, tokenizer), tokenizer, problems[:1], n=10, k=[10], temperature=0.0)


def test_evaluate_humaneval_end_to_end(smollm2, problems):
    _end_to_end(smollm2, problems, max_new_tokens=128)  # about 5 s on 2 idle cores


def test_completion_that_exits_early_does_not_pass(problems):
    """`sys.exit(0)` before check() runs ends with status 0, but only the judge's verdict counts."""
    from lmforge.eval.humaneval import evaluate_humaneval
    from lmforge.inference.engine import RequestOutput

    class Canned:  # an engine whose every completion quits before the tests
        max_context = 4096

        def generate(self, prompts, params):
            return [RequestOutput("r", [], "    import sys\n    sys.exit(0)\n", None, True, "stop", 1, 1)
                    for _ in prompts]

    tok = type("Tok", (), {"encode": staticmethod(lambda text: [1])})()
    report = evaluate_humaneval(Canned(), tok, problems[:2], n=1, k=[1], temperature=0.0)
    assert report["pass@k"][1] == 0.0 and report["statuses"]["failed"] == 2
    r = run_many([problems[0]["prompt"] + "    import sys\n    sys.exit(0)\n"])[0]  # the bare program exits 0
    assert r.status == "passed"


def test_prompts_longer_than_the_context_keep_their_end(problems):
    from lmforge.eval.humaneval import evaluate_humaneval
    from lmforge.inference.engine import RequestOutput

    seen = []

    class Short:  # a model with a 40-token context
        max_context = 40

        def generate(self, prompts, params):
            seen.extend(prompts)
            return [RequestOutput("r", [], "    return None\n", None, True, "stop", 1, 1) for _ in prompts]

    tok = type("Tok", (), {"encode": staticmethod(lambda text: list(range(len(text.split()))))})()
    report = evaluate_humaneval(Short(), tok, problems[:3], n=1, k=[1], temperature=0.0, max_new_tokens=8)
    full = [tok.encode(p["prompt"]) for p in problems[:3]]
    assert [s for s in seen] == [ids[-32:] for ids in full]
    assert report["truncated_prompts"] == sum(len(ids) > 32 for ids in full) > 0
    with pytest.raises(ValueError, match="leaves no room"):
        evaluate_humaneval(Short(), tok, problems[:1], n=1, k=[1], temperature=0.0, max_new_tokens=40)
