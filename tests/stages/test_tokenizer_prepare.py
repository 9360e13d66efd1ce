"""`lmforge tokenizer` and `lmforge prepare` end to end through the CLI on real Python standard-library code."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lmforge import cli
from lmforge.data.shards import open_split, read_index
from lmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """30 small real standard-library modules, plus a tests/ folder that the runs exclude."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    root = tmp_path_factory.mktemp("corpus")
    (root / "tests").mkdir()
    for f in [f for f in files if 0 < f.stat().st_size < 20_000][:30]:
        shutil.copy(f, root / f.name)
    (root / "tests" / "test_skip.py").write_text("SKIPPED = True\n")
    return root


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe")
    argv = ["tokenizer", str(corpus), "--output", str(out), "--vocab-size", "800", "--heldout-fraction", "0.2",
            "include=['*.py']", "exclude=['*/tests/*']"]
    assert cli.main(argv) == 0
    return out


def test_tokenizer_verb_writes_files_and_report(bpe_dir, capsys):
    report = json.loads((bpe_dir / "tokenizer_report.json").read_text())
    assert (bpe_dir / "tokenizer.json").exists()
    conf = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    assert conf["eos_token"] == "<|endoftext|>" and "<|im_start|>" in conf["chat_template"]
    d = report["documents"]
    assert d["train"] + d["heldout"] == 30 and d["heldout"] == d["heldout_measured"] > 0  # tests/ excluded
    ours, gpt2 = report["bytes_per_token"]["ours"], report["bytes_per_token"]["gpt2"]
    assert ours["bytes"] == gpt2["bytes"] > 0 and ours["bytes_per_token"] > 1 and gpt2["bytes_per_token"] > 1
    assert ours["vocab_size"] == report["vocab_size"] <= 800 and gpt2["vocab_size"] == 50257


def test_tokenizer_verb_prints_table_and_notes_missing_gpt2(corpus, tmp_path, capsys, monkeypatch):
    import lmforge.tokenizer.train as train

    monkeypatch.setattr(train, "gpt2_tokenizer", lambda: None)
    assert cli.main(["tokenizer", str(corpus), "--output", str(tmp_path), "--kind", "wordpiece",
                     "--vocab-size", "900", "--lowercase", "--heldout-fraction", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "ours" in out and "bytes/token" in out and "GPT-2 tokenizer not available" in out
    report = json.loads((tmp_path / "tokenizer_report.json").read_text())
    assert list(report["bytes_per_token"]) == ["ours"] and report["notes"]
    tok = Tokenizer.from_dir(tmp_path)
    ids = tok.encode("Import OS")
    assert tok.cls_token == "[CLS]" and ids[0] == tok.token_id("[CLS]") and ids[-1] == tok.token_id("[SEP]")


def test_prepare_verb_runs_then_skips(corpus, bpe_dir, tmp_path, capsys):
    argv = ["prepare", str(corpus), "--tokenizer", str(bpe_dir), "--output", str(tmp_path / "shards"),
            "--validation-fraction", "0.1", "--num-workers", "0", "shard_tokens=5000", "exclude=['*/tests/*']"]
    assert cli.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    index = read_index(tmp_path / "shards")
    tok = Tokenizer.from_dir(bpe_dir)
    stream = np.concatenate(open_split(tmp_path / "shards", "train") + open_split(tmp_path / "shards", "validation"))
    assert int((stream == tok.eos_id).sum()) == 30 == sum(s["documents"] for s in index["splits"].values())
    assert index["tokenizer"]["path"] == str(bpe_dir.resolve()) and index["inputs"] == [str(corpus)]
    assert cli.main(argv) == 0
    assert "up to date" in capsys.readouterr().out


def test_prepare_verb_reports_bad_data_clearly(tmp_path, bpe_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    assert cli.main(["prepare", str(bad), "--tokenizer", str(bpe_dir), "--output", str(tmp_path / "o"),
                     "--num-workers", "0"]) == 2
    assert f"error: {bad}:2: no 'text' key" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["prepare", str(tmp_path / "empty"), "--tokenizer", str(bpe_dir), "--output",
                     str(tmp_path / "o")]) == 2
    assert "empty corpus" in capsys.readouterr().err
    assert cli.main(["prepare", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "tokenizer is required" in capsys.readouterr().err
