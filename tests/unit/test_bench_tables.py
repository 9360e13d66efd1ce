"""benchmarks/tables.py renders the docs' benchmark tables from benchmarks/results/*.json, and the committed docs are
in sync with the committed results (so hand-typed figures cannot creep back)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tables():
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "benchmarks" / "tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FAKE = {"benchmark": "prepare_throughput", "date": "2030-01-02T03:04:05+00:00",
        "command": "python x.py --max-files 3", "sizes": {"max_files": 3},
        "machine": {"cpu": "Fake CPU", "cores": 2, "ram_gib": 8.0}, "threads": {"torch": 2},
        "versions": {"lmforge": "0", "torch": "9", "tokenizers": "0.1"},
        "git": {"commit": "0123456789abcdef", "dirty": True},
        "load_avg_before": [0.5, 0, 0], "load_avg_after": [1.5, 0, 0],
        "result": {"files": 3, "mb": 1.25, "tokens": 4321, "workers": 2, "peer_api": "Tokenizer.encode_batch_fast",
                   "ours_mb_s": 12.5, "peer_mb_s": 5.0, "ratio": 2.5}}


def test_a_block_is_rendered_from_its_result_with_provenance():
    tables = _tables()
    doc = ("intro\n<!-- bench:prepare_throughput -->\nstale 9.99x typed by hand\n"
           "<!-- /bench:prepare_throughput -->\nend\n")
    out = tables.render(doc, {"prepare_throughput": FAKE})
    assert out.startswith("intro\n<!-- bench:prepare_throughput -->\n")
    assert out.endswith("<!-- /bench:prepare_throughput -->\nend\n")
    assert "9.99x" not in out
    assert "| 12.50 | 5.00 | 2.50× |" in out and "encode_batch_fast" in out
    assert "Fake CPU, 2 cores" in out and "commit 0123456789 + uncommitted changes" in out
    assert "load 0.5 before, 1.5 after" in out
    assert tables.render(out, {"prepare_throughput": FAKE}) == out  # idempotent
    assert "Not measured yet" in tables.render(doc, {})
    assert "2.50×" in tables.render("<!-- bench:summary -->\n<!-- /bench:summary -->", {"prepare_throughput": FAKE})


def test_unknown_block_is_an_error():
    with pytest.raises(KeyError, match="nope"):
        _tables().render("<!-- bench:nope -->\n<!-- /bench:nope -->", {}, "doc.md")


def test_check_mode_flags_a_stale_document(tmp_path, monkeypatch):
    tables = _tables()
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- bench:prepare_throughput -->\nold\n<!-- /bench:prepare_throughput -->\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "prepare_throughput.json").write_text(json.dumps(FAKE))
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    monkeypatch.setattr(tables, "documents", lambda root=tmp_path: [tmp_path / "README.md"])
    assert tables.main(["--check", "--results", str(tmp_path / "results")]) == 1
    assert tables.main(["--results", str(tmp_path / "results")]) == 0
    assert tables.main(["--check", "--results", str(tmp_path / "results")]) == 0


def test_committed_docs_match_committed_results():
    assert _tables().main(["--check"]) == 0, "run: python benchmarks/tables.py"
