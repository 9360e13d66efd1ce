"""Tokenizer training: byte-level BPE (ChatML markers, template) and WordPiece ([CLS] ... [SEP]) on real code."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from lmforge.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from lmforge.tokenizer.train import BPE_SPECIAL, bytes_per_token, gpt2_tokenizer, train_tokenizer


def stdlib_texts(n: int = 30) -> list[str]:
    """Texts of the first `n` small top-level modules of the Python standard library."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f.read_text(encoding="utf-8") for f in files if 0 < f.stat().st_size < 20_000][:n]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return stdlib_texts()


@pytest.fixture(scope="module")
def bpe(texts) -> Tokenizer:
    return train_tokenizer(iter(texts[:25]), "bpe", vocab_size=1000)


def test_bpe_round_trips_and_has_special_tokens_first(bpe, texts):
    assert 900 <= bpe.vocab_size <= 1000
    held_out = texts[25:]
    for text in held_out:
        assert bpe.decode(bpe.encode(text)) == text
    specials = [*BPE_SPECIAL.values(), "<|im_start|>", "<|im_end|>"]
    assert [bpe.token_id(t) for t in specials] == list(range(7))
    assert bpe.encode("<|im_start|>user\nhi<|im_end|>")[0] == bpe.token_id("<|im_start|>")
    assert bpe.eos_token == "<|endoftext|>" and bpe.chat_template == DEFAULT_CHAT_TEMPLATE
    assert bpe.encode("héllo ✓") and bpe.decode(bpe.encode("héllo ✓")) == "héllo ✓"  # bytes never unknown


def test_bpe_saves_and_loads_with_transformers(bpe, tmp_path):
    bpe.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.fingerprint() == bpe.fingerprint() and again.chat_template == DEFAULT_CHAT_TEMPLATE
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "def f(x):\n    return x + 1  # ok"
    assert hf(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)
    assert hf.eos_token == "<|endoftext|>"
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


def test_split_digits_gives_one_token_per_digit(texts):
    tok = train_tokenizer(iter(texts[:10] + ["12345 67890 " * 50]), "bpe", vocab_size=500, split_digits=True)
    ids = tok.encode("x = 31415")
    assert [tok.decode([i]) for i in ids[-5:]] == list("31415")


def test_wordpiece_encodes_with_cls_and_sep(texts):
    tok = train_tokenizer(iter(texts), "wordpiece", vocab_size=1500, lowercase=True)
    ids = tok.encode("Return The VALUE")
    assert ids[0] == tok.token_id("[CLS]") == 2 and ids[-1] == tok.token_id("[SEP]") == 3
    assert tok.decode(ids) == "return the value"
    pair = tok.backend.encode("a b", "c d").ids
    assert pair.count(tok.token_id("[SEP]")) == 2
    assert tok.pad_token == "[PAD]" and tok.mask_token == "[MASK]" and tok.unk_token == "[UNK]"
    assert tok.encode("zzzq", add_special_tokens=False) != []  # unseen words fall back to pieces or [UNK]


def test_bytes_per_token_ours_vs_gpt2(bpe, texts):
    ours, n_bytes, n_tokens = bytes_per_token(bpe, texts[25:])
    assert n_bytes == sum(len(t.encode()) for t in texts[25:]) and ours == n_bytes / n_tokens
    assert 1.5 < ours < 8
    gpt2 = gpt2_tokenizer()
    assert gpt2 is not None and gpt2.vocab_size == 50257
    theirs, _, _ = bytes_per_token(gpt2, texts[25:])
    assert 1.0 < theirs < 8
