"""A pipeline's bars: numbers read from the JSON files stages wrote, compared with a constant or another stage's
number (with a margin in standard errors of the difference), and a clear verdict when a number is missing."""

from __future__ import annotations

import json
import math

import pytest

from lmforge.config import ConfigError, load_config
from lmforge.stages._bars import Bar, check_bars
from lmforge.stages.pipeline import Config


@pytest.fixture
def run(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "sft").mkdir()
    (tmp_path / "base" / "eval.json").write_text(json.dumps({"tasks": {"doc": {"f1": 0.20, "f1_stderr": 0.03}}}))
    (tmp_path / "sft" / "eval.json").write_text(json.dumps(
        {"tasks": {"doc": {"f1": 0.31, "f1_stderr": 0.04}}, "steps": [{"kept": 5}, {"kept": 3}], "name": "x"}))
    return tmp_path


def _one(run, **kw) -> dict:
    bar = Bar(stage="sft", what="w", **kw)
    bar.validate()
    (row,) = check_bars([bar], run)
    return row


def test_margin_in_standard_errors_of_the_difference(run):
    # 0.31 - 0.20 = 0.11; sqrt(0.03^2 + 0.04^2) = 0.05: more than 2 s.e. (0.10), not more than 3 (0.15)
    two = _one(run, value="sft/eval.json:tasks.doc.f1", above="base/eval.json:tasks.doc.f1", stderrs=2)
    assert two["pass"] and math.isclose(two["margin"], 0.10) and two["stderr"] == 0.04
    assert not _one(run, value="sft/eval.json:tasks.doc.f1", above="base/eval.json:tasks.doc.f1", stderrs=3)["pass"]
    # the other way round, a plain comparison
    assert not _one(run, value="base/eval.json:tasks.doc.f1", above="sft/eval.json:tasks.doc.f1")["pass"]
    # not lower beyond noise: 0.20 may fall short of 0.31 by less than 3 s.e. (0.15), not by less than 2 (0.10)
    lower = _one(run, value="base/eval.json:tasks.doc.f1", above="sft/eval.json:tasks.doc.f1", stderrs=-3)
    assert lower["pass"] and "less 3 s.e." in lower["needed"]
    assert not _one(run, value="base/eval.json:tasks.doc.f1", above="sft/eval.json:tasks.doc.f1", stderrs=-2)["pass"]


def test_constants_times_and_list_indices(run):
    assert _one(run, value="sft/eval.json:steps.1.kept", below=3)["pass"]
    assert not _one(run, value="sft/eval.json:steps.0.kept", below=3)["pass"]
    # within +5% of the base: 0.31 <= 0.20 * 1.05 fails, 0.20 <= 0.31 * 1.05 holds
    assert not _one(run, value="sft/eval.json:tasks.doc.f1", below="base/eval.json:tasks.doc.f1", times=1.05)["pass"]
    assert _one(run, value="base/eval.json:tasks.doc.f1", below="sft/eval.json:tasks.doc.f1", times=1.05)["pass"]


@pytest.mark.parametrize("value, needle", [
    ("sft/eval.json:tasks.doc.em", "no 'tasks.doc.em'"),
    ("gone/eval.json:tasks.doc.f1", "cannot be read"),
    ("sft/eval.json:name", "expected a number"),
    ("sft/eval.json:steps.7.kept", "no key '7'"),
])
def test_a_missing_number_fails_the_bar_and_says_why(run, value, needle):
    row = _one(run, value=value, above=0)
    assert not row["pass"] and needle in row["error"] and row["measured"] == "not measured"


def test_bad_bars_are_config_errors(tmp_path):
    stages = {"a": {"verb": "evaluate", "config": {"model": "m"}}}
    with pytest.raises(ConfigError, match="exactly one of above and below"):
        load_config(Config, None, {"stages": stages, "bars": [{"stage": "a", "what": "w", "value": "a/x.json:k"}]})
    with pytest.raises(ConfigError, match="no stage 'b'"):
        load_config(Config, None, {"stages": stages, "bars": [{"stage": "b", "what": "w", "value": "1", "above": 0}]})
