"""Verifiable rewards: each built-in scores what it should, code rewards survive misbehaving code (0.0, never an
exception), and bad reward configs fail early with the name, the option and what is expected."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.rl.rewards import RewardSpec, Rewards, exact_match, regex_format, resolve_reward, unit_tests


# ---- exact_match

@pytest.mark.parametrize("completion, answer, options, expected", [
    ("Fraction(3, 4)", "Fraction(3, 4)", {}, 1.0),
    ("  Fraction(3, 4)\n", "Fraction(3, 4)", {}, 1.0),  # surrounding whitespace never counts
    ("```\n[1, 2, 3]\n```", "[1, 2, 3]", {}, 1.0),  # a fenced answer is unwrapped
    ("```python\n'abc'\n```", "'abc'", {}, 1.0),
    ("`42`", "42", {}, 1.0),
    ("`42`", "42", {"strip_code": False}, 0.0),
    ("Fraction(3, 5)", "Fraction(3, 4)", {}, 0.0),
    ("TRUE", "True", {}, 0.0),
    ("TRUE", "True", {"ignore_case": True}, 1.0),
    ("[1,  2,\n 3]", "[1, 2, 3]", {}, 0.0),
    ("[1,  2,\n 3]", "[1, 2, 3]", {"ignore_whitespace": True}, 1.0),
    ("[1,2,3]", "[1, 2, 3]", {"ignore_whitespace": True}, 0.0),  # collapses runs, does not remove them
    ("hello, world!", "hello world", {"ignore_punctuation": True}, 1.0),
    ("The answer is 42.", "42", {"regex": r"answer is (-?\d+)"}, 1.0),
    ("No number here", "42", {"regex": r"answer is (-?\d+)"}, 0.0),
    ("42\nbecause reasons", "42", {"first_line": True}, 1.0),
    ("42\nbecause reasons", "42", {}, 0.0),
    ("7", 7, {}, 1.0),  # numeric answers compare as text
    ("b", ["a", "b"], {}, 1.0),  # a list of accepted answers
])
def test_exact_match(completion, answer, options, expected):
    assert exact_match(completion, {"answer": answer}, **options) == expected


def test_exact_match_reads_the_named_field():
    assert exact_match("x", {"answer": "y", "target": "x"}, field="target") == 1.0


# ---- regex_format

@pytest.mark.parametrize("completion, options, expected", [
    ("<think>a\nb</think> <answer>1</answer>", {"pattern": r"<think>.*</think>\s*<answer>.*</answer>"}, 1.0),
    ("<think>a</think>", {"pattern": r"<think>.*</think>\s*<answer>.*</answer>"}, 0.0),
    ("so <answer>1</answer> then", {"pattern": r"<answer>.*</answer>"}, 0.0),  # fullmatch by default
    ("so <answer>1</answer> then", {"pattern": r"<answer>.*</answer>", "mode": "search"}, 1.0),
    ("line1\nline2", {"pattern": r"line1.line2", "flags": ""}, 0.0),  # without s, '.' stops at newlines
    ("ABC", {"pattern": "abc", "flags": "i"}, 1.0),
])
def test_regex_format(completion, options, expected):
    assert regex_format(completion, {}, **options) == expected


# ---- unit_tests in the sandbox

ADD = {"tests": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "entry_point": "add"}


def test_unit_tests_pass_fail_and_code_extraction():
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    raw = "def add(a, b):\n    return a + b\n"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    syntax = "```python\ndef add(a, b) return\n```"
    empty = "I cannot do that."
    asserts = {"tests": "assert add(1, 1) == 2\n"}  # plain asserts, no check(): run as they are
    assert unit_tests([good, raw, wrong, syntax, empty, raw], [ADD, ADD, ADD, ADD, ADD, asserts]) == \
        [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_unit_tests_prefix_field_supplies_imports():
    rec = {"tests": "assert f([3, 1]) == [1, 3]\n", "header": "from typing import List\n"}
    code = "def f(x: List[int]) -> List[int]:\n    return sorted(x)\n"
    assert unit_tests([code], [rec], extract="raw") == [0.0]  # List is undefined without the header
    assert unit_tests([code], [rec], extract="raw", prefix_field="header") == [1.0]


@pytest.mark.parametrize("body", [
    "while True:\n    pass",  # loops forever: killed at the time limit
    "x = []\nwhile True:\n    x.append(' ' * 10**7)",  # allocates without bound: stopped at the memory limit
    "open('/tmp/lmforge_reward_escape.txt', 'w').write('x')",  # writes outside its temporary directory
    "import socket\nsocket.socket().connect(('127.0.0.1', 80))",  # opens a socket
    "import os\nos.system('true')",  # starts a process
    "import sys\nsys.exit(0)",  # exits 'successfully' before the tests run
    "import os\nos._exit(0)",
])
def test_misbehaving_code_scores_zero_not_a_crash(body):
    code = f"def add(a, b):\n    return a + b\n{body}\n"
    scores = unit_tests([code], [ADD], extract="raw", timeout_s=3.0, cpu_s=3, memory_mb=256)
    assert scores == [0.0]
    assert not __import__("os").path.exists("/tmp/lmforge_reward_escape.txt")


# ---- combining and resolving

def test_rewards_weighted_sum_and_none_as_missing(tmp_path):
    mod = tmp_path / "my_rewards.py"
    mod.write_text("def length_bonus(completion, record, scale=1.0):\n    return scale * len(completion)\n\n"
                   "def unsure(completion, record):\n    return None if completion == '?' else 1.0\n")
    rw = Rewards([RewardSpec("exact_match", 2.0), RewardSpec(f"{mod}:length_bonus", 0.5, {"scale": 0.1}),
                  RewardSpec(f"{mod}:unsure", 1.0)])
    assert rw.names == ["exact_match", "length_bonus", "unsure"]
    total, parts = rw.score(["ab", "?"], [{"answer": "ab"}, {"answer": "x"}])
    torch.testing.assert_close(parts[0], torch.tensor([1.0, 0.2, 1.0]))
    assert parts[1, 0] == 0.0 and math.isnan(parts[1, 2])
    torch.testing.assert_close(total, torch.tensor([2.0 + 0.1 + 1.0, 0.05]))


def test_a_completion_no_reward_can_score_is_nan(tmp_path):
    mod = tmp_path / "r.py"
    mod.write_text("def never(completion, record):\n    return None\n")
    total, _ = Rewards([RewardSpec(f"{mod}:never")]).score(["a"], [{}])
    assert math.isnan(total.item())


def test_batched_user_reward_and_importable_module():
    assert resolve_reward("lmforge.rl.rewards:exact_match") is exact_match
    rw = Rewards([RewardSpec("unit_tests", options={"timeout_s": 5.0})])
    assert rw.fields() == ["tests"]


@pytest.mark.parametrize("spec, needle", [
    (RewardSpec("exact_mach"), "did you mean 'exact_match'"),
    (RewardSpec("no_such_module_xyz:f"), "cannot import module 'no_such_module_xyz'"),
    (RewardSpec("lmforge.rl.rewards:exact_mtch"), "did you mean 'exact_match'"),
    (RewardSpec("exact_match", options={"feild": "answer"}), "unknown option 'feild'; did you mean 'field'"),
    (RewardSpec("regex_format"), "missing required option(s) ['pattern']"),
    (RewardSpec("regex_format", options={"pattern": "(unclosed"}), "missing ), unterminated subpattern"),
    (RewardSpec("regex_format", options={"pattern": "a", "flags": "q"}), "unknown letter(s) ['q']"),
])
def test_bad_reward_configs_fail_early(spec, needle):
    with pytest.raises(ValueError) as e:
        Rewards([spec])
    assert needle in str(e.value) and "rewards[0]" in str(e.value)


def test_records_missing_a_reward_field_are_named():
    from lmforge.data.readers import DataError

    rw = Rewards([RewardSpec("exact_match", options={"field": "target"})])
    with pytest.raises(DataError, match=r"p.jsonl:2: the rewards read field\(s\) \['target'\]"):
        rw.check_records([("p.jsonl:1", {"target": "x"}), ("p.jsonl:2", {"answer": "x"})])


def test_a_reward_returning_a_non_number_is_an_error(tmp_path):
    mod = tmp_path / "bad.py"
    mod.write_text("def text(completion, record):\n    return 'yes'\n")
    with pytest.raises(TypeError, match="returned str 'yes'"):
        Rewards([RewardSpec(f"{mod}:text")]).score(["a"], [{}])
