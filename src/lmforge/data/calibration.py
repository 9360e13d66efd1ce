"""Calibration tokens for the compress stage (GPTQ, Wanda, SparseGPT): random windows of real text, tokenized with
the model's tokenizer, as GPTQ's reference draws 128 random 2048-token windows of C4 documents.

The default source is the standard library's sources without the modules `stdlib-ppl` holds out, so the held-out
bits per byte that `compress.json` reports are measured on text the calibration never saw.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from .readers import expand_inputs, read_file

__all__ = ["calibration_windows", "heldout_excludes"]


def heldout_excludes() -> list[str]:
    """Patterns that leave out the standard library's tests and the modules `stdlib-ppl` scores."""
    from .stdlib import stdlib_heldout_texts

    root = sysconfig.get_paths()["stdlib"]
    return (["*/site-packages/*", "*/test/*", "*/tests/*", "*/idle_test/*", "*/__pycache__/*"]
            + [f"{root}/{name}" for name, _ in stdlib_heldout_texts()])


def calibration_windows(inputs: list[str], tokenizer, samples: int = 128, seq_len: int = 512, seed: int = 0,
                        include: list[str] | None = None, exclude: list[str] | None = None,
                        max_documents: int = 5000) -> Tensor:
    """(samples, seq_len) token ids: each row a window at a random offset of a random document long enough to hold
    it (documents tokenized without special tokens; at most `max_documents` read, in input order). ValueError when
    the inputs hold no document of seq_len tokens."""
    if samples < 1 or seq_len < 2:
        raise ValueError(f"samples must be >= 1 and seq_len >= 2, found {samples} and {seq_len}")
    exclude = heldout_excludes() if exclude is None else exclude
    docs: list[list[int]] = []
    for i, path in enumerate(expand_inputs(inputs, include, exclude)):
        if i >= max_documents:
            break
        for d in read_file(Path(path)):
            ids = tokenizer.encode(d.text, add_special_tokens=False)
            if len(ids) >= seq_len:
                docs.append(ids)
    if not docs:
        raise ValueError(f"calibration: no document of at least {seq_len} tokens in {inputs}; give longer texts or "
                         f"a smaller seq_len")
    rng = random.Random(seed)
    rows = []
    for _ in range(samples):
        ids = docs[rng.randrange(len(docs))]
        start = rng.randrange(len(ids) - seq_len + 1)
        rows.append(ids[start:start + seq_len])
    return torch.tensor(rows, dtype=torch.long)  # (samples, seq_len)
