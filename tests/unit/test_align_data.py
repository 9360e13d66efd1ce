"""Alignment data built from real data: HumanEval mutation pairs checked in the sandbox, stdlib docstring pairs,
KTO records, RL prompts with verifiable answers, and the on-demand build."""

from __future__ import annotations

import ast
import json
import re

import pytest

from lmforge.data import align_data as ad
from lmforge.data.code_problems import code_test, extract_code, load_problems
from lmforge.sandbox import SandboxLimits, run_many

LIMITS = SandboxLimits(timeout_s=5.0, cpu_s=5)


@pytest.fixture(scope="module")
def problems():
    return load_problems()[::16]  # 11 problems spread over the file


@pytest.fixture(scope="module")
def code_pairs(problems):
    return ad.humaneval_pairs(problems, workers=2)


def _all(splits):
    return splits["train"] + splits["test"]


def _code(reply) -> str:
    return extract_code(reply[0]["content"])


def test_canonical_passes_and_every_rejected_fails_in_the_sandbox(problems, code_pairs):
    by_id = {p["task_id"]: p for p in problems}
    pairs = _all(code_pairs)
    assert {r["task_id"] for r in pairs} == set(by_id)  # every problem got a failing mutation
    programs = [code_test(by_id[r["task_id"]], _code(r[side])) for r in pairs for side in ("chosen", "rejected")]
    results = run_many(programs, LIMITS, workers=2)
    for r, chosen, rejected in zip(pairs, results[::2], results[1::2]):
        assert chosen.status == "passed", (r["task_id"], chosen.detail)
        assert rejected.status != "passed", (r["task_id"], r["mutation"])
        assert r["rejected_status"] == rejected.status and "lmforge-sandbox" not in r["rejected_detail"]


def test_mutations_are_real_code_changes_of_the_solution_only(problems, code_pairs):
    by_id = {p["task_id"]: p for p in problems}
    for r in _all(code_pairs):
        p = by_id[r["task_id"]]
        chosen, rejected = _code(r["chosen"]), _code(r["rejected"])
        assert chosen.rstrip() == (p["prompt"] + p["canonical_solution"]).rstrip()
        assert ast.dump(ast.parse(chosen)) != ast.dump(ast.parse(rejected)), r["mutation"]
        assert rejected.startswith(p["prompt"])  # the prompt's code (signature, docstring, helpers) is untouched
        assert r["source"] == f"human-eval:{r['task_id']}" and r["mutation"].split(":")[0] in {
            "compare", "arith", "constant", "boolop", "negate", "name", "unwrap", "return", "drop", "range"}


def test_chat_prompt_is_the_one_the_chat_evaluation_asks(monkeypatch, problems, code_pairs):
    import lmforge.tokenizer.chat as chat
    from lmforge.eval.humaneval import _chat_prompt

    seen = []

    class Encoded:
        ids = [0]

    monkeypatch.setattr(chat, "encode_chat", lambda tok, messages, **kw: seen.append(messages) or Encoded())
    by_id = {p["task_id"]: p for p in problems}
    for r in _all(code_pairs):
        _chat_prompt(None, by_id[r["task_id"]])
        assert r["prompt"] == seen[-1]


def test_plain_form_pairs_are_function_bodies(problems):
    splits = ad.humaneval_pairs(problems[:3], chat=False, workers=2)
    for r, p in zip(_all(splits), problems[:3]):
        assert r["prompt"] == p["prompt"] and r["chosen"] == p["canonical_solution"] and r["rejected"] != r["chosen"]


def test_code_pairs_are_deterministic_and_split_by_task(problems, code_pairs):
    again = ad.humaneval_pairs(problems, workers=2)
    assert json.dumps(again) == json.dumps(code_pairs)
    train, test = ({r["task_id"] for r in code_pairs[s]} for s in ("train", "test"))
    assert not train & test
    prompts = ad.humaneval_prompts(problems)
    assert {r["task_id"] for r in prompts["test"]} == test  # the RL prompts hold out the same problems


def test_mutation_kinds_on_a_small_function():
    source = ('def f(xs, n):\n    """Doc 1 < 2 and 3."""\n    total = 0\n    for i in range(n):\n'
              '        if xs[i] < 3 and i > 0:\n            total += xs[i] * 2\n    return max(total, 1)\n')
    muts = ad.mutations(source, "f")
    assert {"compare", "arith", "constant", "boolop", "negate", "name", "range", "drop"} <= {m.kind for m in muts}
    original = ast.dump(ast.parse(source))
    doc_end = source.index('"""\n', 20) + 3
    for m in muts:
        new = m.apply(source)
        assert ast.dump(ast.parse(new)) != original, m
        assert m.start > doc_end and new[:doc_end] == source[:doc_end]  # the docstring is never mutated
    with pytest.raises(ValueError, match="no top-level function"):
        ad.mutations(source, "g")


@pytest.fixture(scope="module")
def functions():
    return ad.stdlib_functions()


@pytest.fixture(scope="module")
def doc_pairs(functions):
    return ad.docstring_pairs(functions)


def test_docstring_pairs_are_real_and_wrong_in_the_right_way(functions, doc_pairs):
    summary = {f["qualname"]: f["summary"] for f in functions}
    pairs = _all(doc_pairs)
    assert len(pairs) >= 1000 and len({f["module"] for f in functions}) >= 100
    for r in pairs:
        asked, other = r["source"].removeprefix("stdlib:"), r["rejected_source"].removeprefix("stdlib:")
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert r["prompt"][0]["content"] == f"What does `{asked}` do?"
        assert chosen == summary[asked] and rejected == summary[other]  # both are real docstring summaries
        assert other != asked and chosen != rejected
        name = asked.rsplit(".", 1)[-1]
        assert not re.search(rf"\b{re.escape(name)}\b", chosen + " " + rejected)  # no name to match on
    same_module = sum(r["rejected_source"].split(".")[0] == r["source"].split(".")[0] for r in pairs)
    assert same_module > 0.9 * len(pairs)


def test_docstring_pairs_deterministic_and_split_by_module(functions, doc_pairs):
    assert json.dumps(ad.docstring_pairs(functions)) == json.dumps(doc_pairs)
    import sysconfig
    from pathlib import Path

    email = Path(sysconfig.get_paths()["stdlib"]) / "email"  # a part of the library: re-reading all of it is slow
    assert ad.stdlib_functions(email) == ad.stdlib_functions(email) != []
    module = {f["qualname"]: f["module"] for f in functions}
    mods = {s: {module[r[k].removeprefix("stdlib:")] for r in doc_pairs[s] for k in ("source", "rejected_source")}
            for s in doc_pairs}
    assert doc_pairs["test"] and not mods["train"] & mods["test"]  # chosen and rejected texts stay in their split
    texts = {s: {r[k][0]["content"] for r in doc_pairs[s] for k in ("chosen", "rejected")} for s in doc_pairs}
    assert not texts["train"] & texts["test"] - _shared_texts(functions)
    plain = ad.docstring_pairs(functions[:200], chat=False)
    r = _all(plain)[0]
    assert r["prompt"].startswith("Question: What does `") and r["chosen"].startswith(" ")


def _shared_texts(functions):
    """Summaries that more than one module uses word for word (they may appear on both sides of the split)."""
    seen: dict[str, set[str]] = {}
    for f in functions:
        seen.setdefault(f["summary"], set()).add(f["module"])
    return {t for t, mods in seen.items() if len(mods) > 1}


def test_kto_records_unpair_each_pair():
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b", "source": "s", "rejected_source": "t"}]
    assert ad.kto_records(pairs) == [{"prompt": "p", "completion": "a", "label": True, "source": "s"},
                                     {"prompt": "p", "completion": "b", "label": False, "source": "t"}]


def test_doctest_prompts_have_checkable_answers():
    chat, plain = ad.doctest_prompts(), ad.doctest_prompts(chat=False)
    assert len(_all(chat)) >= 300 and [r["answer"] for r in _all(chat)] == [r["answer"] for r in _all(plain)]
    for c, p in zip(_all(chat), _all(plain)):
        assert c["answer"].strip() and p["prompt"].rstrip("\n").splitlines()[-1].startswith(">>> ")
        assert c["prompt"][0]["content"].startswith(ad.DOCTEST_INSTRUCTION)
        assert p["prompt"].rstrip() in c["prompt"][0]["content"] and c["source"] == p["source"]
    groups = {s: {r["source"].rsplit(":", 1)[0] for r in chat[s]} for s in chat}
    assert chat["test"] and not groups["train"] & groups["test"]
    assert json.dumps(ad.doctest_prompts()) == json.dumps(chat)


def test_humaneval_prompt_records_build_the_reward_program():
    problem = load_problems()[0]
    rec = ad.humaneval_prompts([problem])
    rec = _all(rec)[0]
    assert rec["task_id"] == problem["task_id"] and rec["source"] == f"human-eval:{problem['task_id']}"
    task = {"prompt": rec["code_prompt"], "test": rec["tests"], "entry_point": rec["entry_point"]}
    good, bad = run_many([code_test(task, problem["canonical_solution"]), code_test(task, "    return None\n")],
                         LIMITS)
    assert good.status == "passed" and bad.status == "failed"


def test_ensure_align_data_builds_only_when_missing_or_stale(tmp_path, monkeypatch):
    calls = []

    def fake_write(out, **kw):
        calls.append(out)
        (out / "x.train.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (out / "x.train.jsonl").write_text("{}\n")
        (out / "manifest.json").write_text(json.dumps({"inputs": ad._fingerprint_inputs(),
                                                       "files": {"x.train.jsonl": {}}}))

    monkeypatch.setattr(ad, "write_align_data", fake_write)
    out = tmp_path / "align"
    assert ad.ensure_align_data(out) == out and len(calls) == 1
    ad.ensure_align_data(out)
    assert len(calls) == 1  # fresh: not rebuilt
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["inputs"]["builder_version"] = -1
    (out / "manifest.json").write_text(json.dumps(manifest))
    ad.ensure_align_data(out)
    assert len(calls) == 2  # built by another builder version: rebuilt
    (out / "x.train.jsonl").unlink()
    ad.ensure_align_data(out)
    assert len(calls) == 3  # a file is missing: rebuilt
