"""Contamination check: planted 13-grams in a real (standard library) corpus and in token shards written by
`prepare` are found, 12-word overlaps and n-grams across documents are not, lm-eval normalisation, chunk and shard
boundaries, hash collisions verified away, tokenizer fingerprint check, empty inputs and clear errors."""

from __future__ import annotations

import json
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.readers import DataError
from lmforge.splits import in_fraction
from lmforge.data.shards import open_split, prepare_shards, read_index
from lmforge.eval import contamination as C
from lmforge.eval.contamination import contamination, is_shards, normalized_words
from lmforge.tokenizer import Tokenizer

N_FILES = 25
SPECIAL = "zq17 zq29 <|endoftext|> zq31 zq44"
"""An example holding special-token text, which `prepare` tokenizes as text (not as the special id)."""


def _stdlib_files(n: int = N_FILES) -> list[Path]:
    """Small top-level standard library modules: real code, the same on every run."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f for f in files if 2_000 < f.stat().st_size < 20_000][:n]


def _examples(k: int, words: int = 30, seed: int = 0) -> list[str]:
    """`k` examples of random made-up words: no 2-gram of them occurs in the standard library."""
    rng = random.Random(seed)
    return [" ".join(f"zq{rng.randrange(10**6)}" for _ in range(words)) for _ in range(k)]


def _plant(path: Path, text: str) -> None:
    """Insert `text` as a comment in the middle of the file at `path`."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    mid = len(lines) // 2
    path.write_text("".join(lines[:mid] + [f"# {text}\n"] + lines[mid:]), encoding="utf-8")


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A copy of real standard library modules (nothing planted yet)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for f in _stdlib_files():
        shutil.copy(f, root / f.name)
    return root


def _run(tasks, corpus, **kw):
    return contamination(tasks, corpus, show_progress=False, **kw)


# ----------------------------------------------------------------------------- word n-grams on documents

def test_planted_13gram_found_share_is_planted_over_total(corpus):
    ex = _examples(20)
    files = sorted(corpus.iterdir())
    planted = [3, 7, 11, 12]
    for i, f in zip(planted, files):
        words = ex[i].split()
        _plant(f, " ".join(words[5:18]))  # exactly 13 words from inside the example
    r = _run({"qa": ex, "other": _examples(5, seed=1)}, corpus)
    qa = r["tasks"]["qa"]
    assert (qa["examples"], qa["contaminated"], qa["too_short"]) == (20, 4, 0)
    assert qa["share"] == pytest.approx(4 / 20)
    assert qa["first_contaminated"] == planted
    assert qa["matched_ngram_example"] == " ".join(ex[3].split()[5:18])
    assert qa["matched_source"] == str(files[0])
    assert r["tasks"]["other"]["contaminated"] == 0 and r["tasks"]["other"]["share"] == 0.0
    stats = r["corpus"]
    assert stats["kind"] == "documents" and stats["documents"] == N_FILES
    assert stats["bytes"] == sum(len(f.read_bytes()) for f in files)
    assert stats["hash_collisions"] == 0 and stats["mb_per_s"] > 0
    assert r["ngram"] == 13 and r["unit"] == "words" and qa["unit"] == "words"


def test_12_word_overlap_is_not_contamination(corpus):
    ex = _examples(3)
    _plant(corpus / sorted(p.name for p in corpus.iterdir())[2], " ".join(ex[1].split()[:12]))
    assert _run({"t": ex}, corpus)["tasks"]["t"]["contaminated"] == 0
    found = _run({"t": ex}, corpus, n=12)["tasks"]["t"]  # the same overlap is found with n=12
    assert (found["contaminated"], found["first_contaminated"], found["ngram"]) == (1, [1], 12)


def test_case_and_punctuation_differences_still_match(corpus):
    ex = ["Question: What's the capital of France? It's a city on the Seine, known for the Eiffel tower. "
          "Answer: Paris"]
    _plant(sorted(corpus.iterdir())[0], "...WHAT'S the Capital of france?? it's -- a city on the (Seine) known FOR")
    t = _run({"t": ex}, corpus)["tasks"]["t"]
    assert t["contaminated"] == 1
    assert t["matched_ngram_example"] == "whats the capital of france its a city on the seine known for"


def test_normalisation_is_lm_eval_janitor():
    from lm_eval.decontamination.janitor import Janitor

    jan = Janitor()
    texts = [f.read_text(encoding="utf-8") for f in _stdlib_files(5)]
    texts.append("Ünïcode CAFÉ\u00a0x\u3000y\x1cz\u2028w — “quoted” don't e.g. a.b,c")
    for text in texts:
        assert normalized_words(text) == jan.normalize_string(text).split()


def test_every_unicode_whitespace_splits_words():
    spaces = [c for c in map(chr, range(0x110000)) if c.isspace()]
    assert set(spaces) - set(" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f") == set(C._UNICODE_SPACES)
    for c in spaces:
        assert normalized_words(f"a{c}b") == ["a", "b"], repr(c)


def test_ngram_across_two_documents_is_not_found(corpus):
    ex = _examples(1)
    words = ex[0].split()
    a, b = sorted(corpus.iterdir())[:2]
    a.write_text(a.read_text(encoding="utf-8") + "\n# " + " ".join(words[:6]) + "\n", encoding="utf-8")
    b.write_text(" ".join(words[6:13]) + "\n" + b.read_text(encoding="utf-8"), encoding="utf-8")
    assert _run({"t": ex}, corpus)["tasks"]["t"]["contaminated"] == 0
    b.write_text(" ".join(words[:13]) + "\n" + b.read_text(encoding="utf-8"), encoding="utf-8")
    assert _run({"t": ex}, corpus)["tasks"]["t"]["contaminated"] == 1


@pytest.mark.parametrize("chunk_bytes", [40, 97, 1000, 8 << 20])
def test_large_document_cut_into_pieces_loses_no_ngram(corpus, chunk_bytes):
    ex = _examples(6)
    files = sorted(corpus.iterdir())
    for i in (0, 2, 5):
        _plant(files[i], " ".join(ex[i].split()[10:23]))
    big = corpus / "all.txt"  # one document holding every file: cut into many pieces for small chunk_bytes
    big.write_text("\n".join(f.read_text(encoding="utf-8") for f in files), encoding="utf-8")
    r = _run({"t": ex}, [big], chunk_bytes=chunk_bytes)
    assert r["tasks"]["t"]["first_contaminated"] == [0, 2, 5]
    assert r["corpus"]["documents"] == 1
    assert r["corpus"]["words"] == len(normalized_words(big.read_text(encoding="utf-8")))


def test_jsonl_corpus_and_source_line(tmp_path):
    ex = _examples(4)
    docs = [{"text": f.read_text(encoding="utf-8")} for f in _stdlib_files(6)]
    docs.insert(3, {"text": "intro " + " ".join(ex[2].split()[-13:]) + " outro", "id": "planted"})
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    t = _run({"t": ex}, path)["tasks"]["t"]
    assert (t["contaminated"], t["first_contaminated"], t["matched_source"]) == (1, [2], f"{path}:4")


def test_hash_collisions_are_verified_away(corpus, monkeypatch):
    """With a weak word hash (word length), n-grams of equal word lengths collide: exact check rejects them."""
    monkeypatch.setattr(C, "_word_hashes", lambda words: np.array([len(w) for w in words], np.uint64))
    ex = [" ".join(["abc"] * 13), " ".join(["xyz"] * 13)]
    _plant(sorted(corpus.iterdir())[0], " ".join(["xyz"] * 13))
    r = _run({"t": ex}, corpus)
    assert r["tasks"]["t"]["first_contaminated"] == [1]
    assert r["corpus"]["hash_collisions"] == 1


def test_too_short_empty_tasks_and_skipped_scan(corpus):
    r = _run({"short": ["only a few words here", ""], "none": []}, corpus)
    assert r["tasks"]["short"] == {"examples": 2, "contaminated": 0, "share": 0.0, "too_short": 2, "ngram": 13,
                                   "unit": "words", "first_contaminated": [], "matched_ngram_example": None,
                                   "matched_source": None}
    assert r["tasks"]["none"]["examples"] == 0 and r["tasks"]["none"]["share"] is None
    assert r["corpus"]["skipped"] == "no task example has 13 or more words" and r["corpus"]["ngrams"] == 0
    assert _run({}, corpus)["tasks"] == {}


def test_empty_and_missing_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty corpus"):
        _run({"t": _examples(2)}, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _run({"t": _examples(2)}, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):  # checked even when there is nothing to scan for
        _run({}, [tmp_path / "empty", tmp_path / "nowhere"])


def test_bad_arguments(corpus):
    with pytest.raises(TypeError, match="task 't' example 1"):
        _run({"t": ["a", 3]}, corpus)
    with pytest.raises(TypeError, match="one string"):
        _run({"t": "abc"}, corpus)
    with pytest.raises(ValueError, match="positive"):
        _run({"t": ["a"]}, corpus, n=0)


# ----------------------------------------------------------------------------- token n-grams on shards

@pytest.fixture(scope="module")
def tok_dir(gpt2_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt2")
    gpt2_tokenizer.save(out)
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, list[str], list[int]]:
    """(corpus folder, 12 examples, indices planted): real stdlib files, 3 of which hold a 20-word piece of an
    example in a comment; with validation_fraction 0.5 the second of them goes to validation, the others to train."""
    root = tmp_path_factory.mktemp("tok-corpus")
    ex = _examples(12, seed=3)
    idx = [1, 4, 9]
    for k, f in enumerate(_stdlib_files(12)):
        shutil.copy(f, root / f.name)
        if k < len(idx):
            _plant(root / f.name, " ".join(ex[idx[k]].split()[4:24]))
            text, salt = (root / f.name).read_text(encoding="utf-8"), 0
            while in_fraction(text + f"# {salt}\n", 0.5) != (k == 1):  # choose its split (a hash of the text)
                salt += 1
            (root / f.name).write_text(text + f"# {salt}\n", encoding="utf-8")
    (root / "special.txt").write_text(f"x = 1  # {SPECIAL}\n", encoding="utf-8")
    return root, ex, idx


@pytest.fixture(scope="module")
def shards(planted, tok_dir, tmp_path_factory) -> Path:
    """Shards of the planted corpus by `prepare` (GPT-2 BPE given as a folder), in both splits, files of 3000."""
    return _prepare(planted[0], str(tok_dir), tmp_path_factory.mktemp("shards") / "s", validation_fraction=0.5,
                    shard_tokens=3000)


def _prepare(src: Path, tok, out: Path, **kw) -> Path:
    prepare_shards([src], tok, out, num_workers=0, show_progress=False, **{"validation_fraction": 0.0, **kw})
    return out


def _find(stream: np.ndarray, ids: list[int]) -> int:
    """Offset of the first occurrence of `ids` in `stream`."""
    win = np.lib.stride_tricks.sliding_window_view(stream, len(ids))  # (len - n + 1, n)
    hits = np.flatnonzero((win == np.asarray(ids)).all(1))
    assert len(hits), "planted tokens not in the shards"
    return int(hits[0])


def test_token_shards_planted_found(planted, shards, tok_dir):
    src, ex, idx = planted
    out = shards
    index = read_index(out)
    assert is_shards(out) and not is_shards(src)
    assert all(index["splits"][s]["documents"] > 0 for s in ("train", "validation"))  # both splits scanned
    tok = Tokenizer.from_dir(tok_dir)
    r = _run({"t": ex}, out, tokenizer=tok)
    t, stats = r["tasks"]["t"], r["corpus"]
    assert (t["contaminated"], t["first_contaminated"], t["unit"]) == (3, idx, "tokens")
    assert t["share"] == pytest.approx(3 / 12)
    assert t["matched_ngram_example"] in ex[idx[0]]
    assert stats["kind"] == "shards"
    assert stats["tokens"] == sum(s["tokens"] for s in index["splits"].values())
    splits = []
    for i in idx:  # where each planted example matched, read back from the shard file it names
        one = _run({"t": [ex[i]]}, out, tokenizer=tok)["tasks"]["t"]
        file, offset = one["matched_source"].rsplit(":token ", 1)
        assert Path(file).parent == out
        tokens = np.fromfile(file, dtype=index["dtype"])[int(offset):int(offset) + 13]
        assert tok.decode(tokens.tolist(), skip_special_tokens=False) == one["matched_ngram_example"]
        splits.append(Path(file).name.split("-")[0])
    assert splits == ["train", "validation", "train"]
    # the tokenizer the index names is used when none is given
    assert _run({"t": ex}, out)["tasks"]["t"]["first_contaminated"] == idx


def test_token_ngram_across_chunks_and_shard_files(planted, gpt2_tokenizer, tmp_path):
    src, ex, idx = planted
    out = _prepare(src, gpt2_tokenizer, tmp_path / "one")
    ids = gpt2_tokenizer.encode(" ".join(ex[idx[0]].split()[4:24]), add_special_tokens=False)
    s = next(i for i in range(1, len(ids)) if gpt2_tokenizer.decode(ids[i:i + 1]).startswith(" "))
    gram = ids[s:s + 13]  # 13 tokens from a word start: the example made of just them encodes back to them
    only = [gpt2_tokenizer.decode(gram)]
    assert gpt2_tokenizer.encode(only[0], add_special_tokens=False) == gram
    g = _find(np.asarray(open_split(out, "train")[0]), gram)  # its split offset
    for j in (1, 6, 12):  # a chunk boundary j tokens into the n-gram: only the n-1 token overlap finds it
        r = _run({"t": only}, out, tokenizer=gpt2_tokenizer, chunk_tokens=g + j)
        assert r["tasks"]["t"]["contaminated"] == 1, j
    # across shard files: the split cut into files of g + 6 tokens puts the n-gram in two files
    cut = _prepare(src, gpt2_tokenizer, tmp_path / "cut", shard_tokens=g + 6)
    assert len(read_index(cut)["splits"]["train"]["shards"]) >= 2
    r = _run({"t": only}, cut, tokenizer=gpt2_tokenizer, chunk_tokens=7)
    assert r["tasks"]["t"]["contaminated"] == 1
    assert r["tasks"]["t"]["matched_source"] == f"{cut / 'train-00000.bin'}:token {g}"
    assert r["corpus"]["tokens"] == read_index(cut)["splits"]["train"]["tokens"]


def test_special_token_text_matches_as_prepare_encoded_it(shards, tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.token_id("<|endoftext|>") in tok.encode(SPECIAL, add_special_tokens=False)  # plain encode differs
    assert _run({"t": [SPECIAL]}, shards, tokenizer=tok)["tasks"]["t"]["contaminated"] == 1
    assert tok.token_id("<|endoftext|>") in tok.encode(SPECIAL, add_special_tokens=False)  # tokenizer untouched


def test_tokenizer_fingerprint_mismatch(planted, shards, tok_dir):
    ex, out = planted[1], shards
    other = Tokenizer.from_dir(tok_dir)
    other.backend.add_special_tokens(["<|other|>"])
    want = read_index(out)["tokenizer"]["fingerprint"]
    with pytest.raises(ValueError, match=f"fingerprint {want}.*fingerprint {other.fingerprint()}"):
        _run({"t": ex}, out, tokenizer=other)


def test_shards_without_tokenizer_path_need_one(planted, gpt2_tokenizer, tmp_path):
    src, ex, _ = planted
    out = _prepare(src, gpt2_tokenizer, tmp_path / "shards")  # a Tokenizer object: no path in the index
    with pytest.raises(ValueError, match="pass tokenizer="):
        _run({"t": ex}, out)
    with pytest.raises(ValueError, match="must be the only corpus"):
        _run({"t": ex}, [out, src], tokenizer=gpt2_tokenizer)
