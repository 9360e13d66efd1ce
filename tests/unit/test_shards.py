"""Token shards: round trip, EOS between documents, stable splits, re-run skip, interrupted runs, clear errors."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.readers import DataError, iter_documents
from lmforge.splits import in_fraction
from lmforge.data.shards import FORMAT, open_split, prepare_shards, read_index, token_dtype
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.train import train_tokenizer

SHARD = 4000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """30 small real Python standard-library modules, copied (stable modification times)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    root = tmp_path_factory.mktemp("corpus")
    for f in [f for f in files if 0 < f.stat().st_size < 20_000][:30]:
        shutil.copy(f, root / f.name)
    return root


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer((d.text for d in iter_documents(corpus)), "bpe", vocab_size=800).save(out)
    return out


def _prepare(corpus, tok_dir, out, **kw):
    kw = {"validation_fraction": 0.2, "shard_tokens": SHARD, "num_workers": 0, "show_progress": False, **kw}
    return prepare_shards([corpus], tok_dir, out, **kw)


def _bins(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.suffix == ".bin"}


def test_shards_round_trip_with_eos_between_documents(corpus, tok_dir, tmp_path):
    res = _prepare(corpus, tok_dir, tmp_path, batch_documents=7)
    index, tok = read_index(tmp_path), Tokenizer.from_dir(tok_dir)
    assert not res.skipped and index == res.index
    assert index["format"] == FORMAT and index["dtype"] == "uint16"
    assert index["tokenizer"]["fingerprint"] == tok.fingerprint() and index["tokenizer"]["eos_id"] == tok.eos_id
    docs = list(iter_documents(corpus))
    for split in ("train", "validation"):
        meta = index["splits"][split]
        maps = open_split(tmp_path, split)
        assert [len(m) for m in maps[:-1]] == [SHARD] * (len(maps) - 1) and 0 < len(maps[-1]) <= SHARD
        assert [s["tokens"] for s in meta["shards"]] == [len(m) for m in maps]
        stream = np.concatenate(maps)
        assert stream.dtype == np.dtype("<u2") and stream[-1] == tok.eos_id and len(stream) == meta["tokens"]
        ends = np.flatnonzero(stream == tok.eos_id)
        assert len(ends) == meta["documents"] == sum(s["documents"] for s in meta["shards"])
        pieces = np.split(stream, ends + 1)[:-1]
        want = [d.text for d in docs if in_fraction(d.text, 0.2) == (split == "validation")]
        assert [tok.decode(p[:-1].tolist()) for p in pieces] == want
        assert meta["bytes"] == sum(len(t.encode()) for t in want) == sum(s["bytes"] for s in meta["shards"])
    assert index["splits"]["validation"]["documents"] > 0 and index["splits"]["train"]["documents"] > 15


def test_split_is_identical_across_worker_counts(corpus, tok_dir, tmp_path):
    _prepare(corpus, tok_dir, tmp_path / "one", num_workers=1, batch_documents=3)
    _prepare(corpus, tok_dir, tmp_path / "two", num_workers=2, batch_documents=5)
    one, two = _bins(tmp_path / "one"), _bins(tmp_path / "two")
    assert len(one) >= 3 and one == two
    assert read_index(tmp_path / "one")["splits"] == read_index(tmp_path / "two")["splits"]


def test_rerun_skips_and_changes_need_overwrite(corpus, tok_dir, tmp_path):
    _prepare(corpus, tok_dir, tmp_path)
    stamps = {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    again = _prepare(corpus, tok_dir, tmp_path, num_workers=1)  # workers do not change the output
    assert again.skipped and stamps == {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    with pytest.raises(DataError, match=r"prepared differently \(shard_tokens changed\).*overwrite=true"):
        _prepare(corpus, tok_dir, tmp_path, shard_tokens=SHARD * 2)
    res = _prepare(corpus, tok_dir, tmp_path, shard_tokens=SHARD * 2, overwrite=True)
    assert not res.skipped and res.index["config"]["shard_tokens"] == SHARD * 2
    assert not (tmp_path / f"train-{len(res.index['splits']['train']['shards']):05d}.bin").exists()  # stale gone


def test_interrupted_run_is_cleaned_and_redone(corpus, tok_dir, tmp_path):
    _prepare(corpus, tok_dir, tmp_path / "ref")
    ref = _bins(tmp_path / "ref")
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "ref", out)
    (out / "index.json").unlink()  # killed before the index was written ...
    (out / "train-00002.bin").unlink()
    (out / ".train-00002.bin.tmp").write_bytes(b"\x01\x02\x03")  # ... while writing shard 2
    (out / "train-00009.bin").write_bytes(b"\x00" * 10)  # a stray shard from an older run
    res = _prepare(corpus, tok_dir, out)
    assert not res.skipped and _bins(out) == ref and not list(out.glob(".*tmp"))


def test_failure_mid_run_leaves_no_partial_shard_or_index(corpus, tok_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"text": d.text}) for d in iter_documents(corpus)] + ['{"text": oops}']
    (data / "docs.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"docs.jsonl:{len(lines)}: malformed JSON"):
        _prepare(data, tok_dir, tmp_path / "out")
    left = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert "index.json" not in left and not [n for n in left if n.endswith(".tmp")]
    assert all((tmp_path / "out" / n).stat().st_size == SHARD * 2 for n in left)  # only complete shards
    with pytest.raises(FileNotFoundError, match="did not finish"):
        read_index(tmp_path / "out")


def test_literal_special_token_text_is_not_a_boundary_and_add_bos(tok_dir, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a <|endoftext|> b"}) + "\n" + '{"text": "c"}\n')
    tok = Tokenizer.from_dir(tok_dir)
    _prepare(tmp_path / "d.jsonl", tok_dir, tmp_path / "out", validation_fraction=0.0, add_bos=True)
    [stream] = open_split(tmp_path / "out", "train")
    assert list(stream == tok.eos_id).count(True) == 2 and list(stream == tok.bos_id).count(True) == 2
    assert stream[0] == tok.bos_id and tok.decode(stream[1:-3].tolist()) == "a <|endoftext|> b"
    assert read_index(tmp_path / "out")["splits"]["validation"] == {"shards": [], "tokens": 0, "documents": 0,
                                                                    "bytes": 0}


def test_clear_errors(corpus, tok_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty corpus"):
        _prepare(tmp_path / "empty.jsonl", tok_dir, tmp_path / "a")
    bare = Tokenizer(backend=Tokenizer.from_dir(tok_dir).backend)  # no eos (and no sep) token
    with pytest.raises(DataError, match="has no eos token"):
        prepare_shards([corpus], bare, tmp_path / "b", num_workers=0, show_progress=False)
    _prepare(corpus, tok_dir, tmp_path / "c")
    shard = tmp_path / "c" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=rf"train-00000.bin: {SHARD * 2 - 2} bytes, expected {SHARD * 2} bytes"):
        open_split(tmp_path / "c", "train")
    with pytest.raises(DataError, match=r"no split 'test'; found \['train', 'validation'\]"):
        open_split(tmp_path / "c", "test")
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    (tmp_path / "c" / "index.json").write_text(json.dumps({**index, "format": "other/2"}))
    with pytest.raises(DataError, match="format is 'other/2', expected 'lmforge-shards/1'"):
        read_index(tmp_path / "c")
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_wordpiece_tokenizer_ends_documents_with_sep(corpus, tmp_path):
    tok = train_tokenizer((d.text for d in iter_documents(corpus)), "wordpiece", vocab_size=900)
    res = prepare_shards([corpus], tok, tmp_path, validation_fraction=0.0, num_workers=0, show_progress=False)
    [stream] = open_split(tmp_path, "train")
    sep, cls = tok.token_id("[SEP]"), tok.token_id("[CLS]")
    assert res.index["tokenizer"]["eos_token"] == "[SEP]" and res.index["tokenizer"]["eos_id"] == sep
    assert int((stream == sep).sum()) == 30 and not (stream == cls).any() and stream[-1] == sep
