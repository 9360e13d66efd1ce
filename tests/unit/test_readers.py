"""Document readers: JSONL (+gz), Parquet, text files, directories, globs; clear errors; streaming."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest

from lmforge.data.readers import DataError, ReadStats, expand_inputs, iter_documents
from lmforge.splits import in_fraction


def stdlib_files(n: int = 30) -> list[Path]:
    """The first `n` small top-level modules of the Python standard library: real code, same on every run."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f for f in files if 0 < f.stat().st_size < 20_000][:n]


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small tree: pkg/*.py, pkg/tests/*.py, notes.md, data.bin."""
    files = stdlib_files(8)
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    for f in files[:5]:
        shutil.copy(f, tmp_path / "pkg" / f.name)
    for f in files[5:]:
        shutil.copy(f, tmp_path / "pkg" / "tests" / f.name)
    (tmp_path / "notes.md").write_text("# Notes\nsome text\n")
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden.py").write_text("x = 1\n")
    return tmp_path


def _jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_directory_walk_is_sorted_filtered_and_reads_whole_files(corpus):
    docs = list(iter_documents([corpus], include=["*.py"], exclude=["*/tests/*"]))
    expected = sorted((corpus / "pkg").glob("*.py"))
    assert [d.source for d in docs] == [str(p) for p in expected]
    assert [d.text for d in docs] == [p.read_text(encoding="utf-8") for p in expected]
    assert all(d.id is None for d in docs)
    # default filter: known text suffixes, recursive, hidden files skipped, unknown suffixes skipped
    names = [Path(d.source).name for d in iter_documents(corpus)]
    assert "notes.md" in names and "data.bin" not in names and ".hidden.py" not in names and len(names) == 9
    # a file named directly is always read
    assert [d.text for d in iter_documents(corpus / "data.bin")] == ["\x00\x01"]


def test_jsonl_plain_and_gzip_with_ids_meta_and_sources(tmp_path):
    recs = [{"text": "first", "id": 7, "meta": {"lang": "en"}}, "", {"text": "second"}]
    a = _jsonl(tmp_path / "a.jsonl", recs)
    b = _jsonl(tmp_path / "b.jsonl.gz", [{"text": "third", "id": "x"}], gzip.open)
    docs = list(iter_documents([a, b]))
    assert [(d.text, d.id, d.source) for d in docs] == [
        ("first", "7", f"{a}:1"), ("second", None, f"{a}:3"), ("third", "x", f"{b}:1")]
    assert docs[0].meta == {"lang": "en"}


def test_custom_text_key_and_globs(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        _jsonl(tmp_path / name, [{"content": name}])
    docs = list(iter_documents([str(tmp_path / "*.jsonl")], text_key="content"))
    assert [d.text for d in docs] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        list(iter_documents([str(tmp_path / "*.parquet")]))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(iter_documents([tmp_path / "missing.jsonl"]))


def test_malformed_jsonl_names_file_and_line_and_streams_until_then(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "ok too"}, '{"text": "broken'])
    docs = iter_documents(path)
    assert next(docs).text == "ok"  # streamed: the bad line has not been read yet
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON .* expected one JSON object per line"):
        list(docs)


@pytest.mark.parametrize("record, found", [({"body": "x"}, "no 'text' key .*'body'"),
                                           ({"text": 3}, "'text' is int '3', expected a string"),
                                           ([1, 2], "found a JSON list, expected an object")])
def test_bad_records_say_what_was_found_and_expected(tmp_path, record, found):
    path = _jsonl(tmp_path / "r.jsonl", [{"text": "fine"}, record])
    with pytest.raises(DataError, match=rf"{path}:2: {found}"):
        list(iter_documents(path))


def test_empty_corpus_is_an_error_naming_the_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(DataError, match=r"empty corpus: inputs \[.*empty\].*1 files matched, 1 empty"):
        list(iter_documents(tmp_path / "empty"))


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xc3\xa9 \xff\xfe ok")
    stats = ReadStats()
    [doc] = iter_documents(tmp_path / "bad.txt", stats=stats)
    assert doc.text == "café \ufffd\ufffd ok"
    assert stats.replaced == 2 and stats.replaced_files == [str(tmp_path / "bad.txt")]


def test_parquet_documents(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two", ""], "id": ["a", "b", "c"]}), tmp_path / "d.parquet")
    docs = list(iter_documents(tmp_path))
    assert [(d.text, d.id, d.source) for d in docs] == [("one", "a", f"{tmp_path / 'd.parquet'}:1"),
                                                         ("two", "b", f"{tmp_path / 'd.parquet'}:2")]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: no 'text' column \(found body\)"):
        list(iter_documents(tmp_path))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(iter_documents(tmp_path / "d.parquet"))


def test_expand_inputs_keeps_argument_order_and_in_fraction_is_stable(corpus):
    files = expand_inputs([corpus / "notes.md", corpus / "pkg"], include=["*.py", "*.md"], exclude=["*/tests/*"])
    assert files[0].name == "notes.md" and len(files) == 6
    picks = [in_fraction(str(i), 0.3) for i in range(2000)]
    assert picks == [in_fraction(str(i), 0.3) for i in range(2000)] and 500 < sum(picks) < 700
    assert not any(in_fraction(str(i), 0.0) for i in range(100))
