"""`lmforge prepare INPUTS --tokenizer TOK --output DIR`: tokenize documents into token shards for pretraining
(flat uint16/uint32 files + index.json; see `lmforge.data.shards`). Re-running with the same settings is a no-op;
an interrupted run is cleaned up and redone."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

POSITIONAL = ("inputs",)


@dataclass
class Config:
    inputs: list[str]
    """Documents: JSONL (.jsonl/.jsonl.gz), Parquet, text files, directories or globs (quote globs)."""
    tokenizer: str = ""
    """Tokenizer: a folder with tokenizer.json, a model folder or .gguf file, or a model alias / hub id."""
    output: str = "data/shards"
    """Folder for the shard files and index.json."""
    include: list[str] | None = None
    """File-name patterns picked up in directories (e.g. ["*.py"]); default: .jsonl .parquet .txt .md .py .rst."""
    exclude: list[str] = field(default_factory=list)
    """Patterns of paths to skip in directories (e.g. ["*/tests/*"])."""
    text_key: str = "text"
    """Field holding the text in JSONL/Parquet records."""
    validation_fraction: float = 0.005
    """Fraction of documents (chosen by a hash of id or text, stable across runs) for the validation split."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file (the last shard of a split is shorter)."""
    num_workers: int | None = None
    """Tokenizer worker processes (default: one per CPU; 0 tokenizes in this process)."""
    batch_documents: int = 256
    """Documents sent to a worker at a time."""
    max_documents: int | None = None
    """Read at most this many documents (default: all)."""
    add_bos: bool = False
    """Put the tokenizer's BOS token before every document (EOS always follows each one)."""
    overwrite: bool = False
    """Replace finished shards in OUTPUT that were prepared with other settings, tokenizer or inputs."""

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs is empty: give at least one file, directory or glob")
        if not self.tokenizer:
            raise ValueError("tokenizer is required: a tokenizer folder, model folder, .gguf file or alias")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), found {self.validation_fraction}")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, found {self.shard_tokens}")
        if self.batch_documents < 1:
            raise ValueError(f"batch_documents must be >= 1, found {self.batch_documents}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, found {self.num_workers}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be >= 1, found {self.max_documents}")


def main(cfg: Config) -> int:
    from ..data.readers import DataError
    from ..data.shards import prepare_shards

    try:
        res = prepare_shards(cfg.inputs, cfg.tokenizer, cfg.output, include=cfg.include, exclude=cfg.exclude,
                             text_key=cfg.text_key, validation_fraction=cfg.validation_fraction,
                             shard_tokens=cfg.shard_tokens, num_workers=cfg.num_workers,
                             batch_documents=cfg.batch_documents, max_documents=cfg.max_documents,
                             add_bos=cfg.add_bos, overwrite=cfg.overwrite)
    except (DataError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(res.index, cfg.output, res.skipped, res.seconds))
    return 0


def summary(index: dict, output: str, skipped: bool, seconds: float) -> str:
    """A few lines: per split the shards, documents, tokens, MB and bytes per token."""
    from ..data.shards import MAX_PIECE_CHARS

    if skipped:
        head = f"{output} is up to date (same settings, tokenizer and input files); nothing to do"
    else:
        total = sum(s["bytes"] for s in index["splits"].values())
        head = f"wrote {output} ({index['dtype']}) in {seconds:.1f}s, {total / 1e6 / max(seconds, 1e-9):.2f} MB/s"
    lines = [head, f"  {'split':<11} {'shards':>6} {'documents':>10} {'tokens':>12} {'MB':>9} {'bytes/token':>12}"]
    for name, s in index["splits"].items():
        bpt = f"{s['bytes'] / s['tokens']:.3f}" if s["tokens"] else "-"
        lines.append(f"  {name:<11} {len(s['shards']):>6} {s['documents']:>10} {s['tokens']:>12} "
                     f"{s['bytes'] / 1e6:>9.2f} {bpt:>12}")
    stats = index.get("stats", {})
    if stats.get("long_documents_tokenized_in_pieces"):
        lines.append(f"note: {stats['long_documents_tokenized_in_pieces']} documents longer than "
                     f"{MAX_PIECE_CHARS:,} characters were tokenized in pieces cut at line breaks (bounded memory)")
    if stats.get("undecodable_bytes_replaced"):
        lines.append(f"note: {stats['undecodable_bytes_replaced']} undecodable byte sequences replaced by U+FFFD")
    if not index["splits"]["validation"]["tokens"]:
        lines.append("note: the validation split is empty; raise validation_fraction for a small corpus")
    return "\n".join(lines)
