"""`lmforge curate --config recipes/curate/….yaml`: filter, dedup and redact raw documents before the tokenizer.

Reads what `prepare` reads (JSONL(.gz), Parquet, text files, folders, globs, `{stdlib}`); writes to `output`:
`data/part-NNNNN.jsonl.gz` or `.parquet` (the kept documents, {"id", "text", "meta"}: what `tokenizer` and `prepare` take),
`removed/` (every removed document with its step and reason, bad input included, so kept + removed = read),
and `curate.json` (per step: documents and bytes in, kept, removed by reason, seconds). Steps run in the order
`steps` lists them; a re-run skips finished partitions. See docs/curation.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..curate.decontaminate import DecontaminationConfig
from ..curate.exact import ExactDedupConfig
from ..curate.executors import ExecutorConfig
from ..curate.language import LanguageConfig
from ..curate.minhash import NearDedupConfig
from ..curate.perplexity import PerplexityBucketsConfig, PerplexityConfig
from ..curate.pii import PIIConfig
from ..curate.quality import QualityConfig
from ..curate.steps import STEPS
from ..curate.toxicity import ToxicityConfig

POSITIONAL = ("inputs",)
OUTPUT = "data"
"""What a pipeline hands on from this stage (`${curate.output}`): the kept documents, not removed/ or work/."""

@dataclass
class Config:
    inputs: list[str]
    """Documents: files, folders, globs, `{stdlib}` / `{pkg:NAME}` (JSONL(.gz), Parquet, .txt/.md/.py/.rst)."""
    output: str = "data/curated"
    """Output folder: data/, removed/, curate.json (and work/, kept for resuming)."""
    steps: list[str] = field(default_factory=lambda: ["exact_dedup"])
    """The steps, in order, of: language, quality, exact_dedup, near_dedup, pii, toxicity, perplexity,
    perplexity_buckets, decontaminate."""
    format: Literal["jsonl", "parquet"] = "jsonl"
    """How kept documents are written: jsonl (data/part-NNNNN.jsonl.gz) or parquet (data/part-NNNNN.parquet)."""
    text_key: str = "text"
    """Field holding the text in JSONL / Parquet records."""
    include: list[str] | None = None
    """Filename patterns to read from folders (default: .txt .md .py .rst and record files)."""
    exclude: list[str] = field(default_factory=list)
    """Filename patterns to skip."""
    partition_mb: float = 32.0
    """Input megabytes per task (whole files; a larger file is a task of its own)."""
    max_doc_mb: float = 16.0
    """A document (or JSONL line) over this many megabytes is removed as input:too_large, never read whole."""
    language: LanguageConfig = field(default_factory=LanguageConfig)
    """Keep documents in the listed languages (fastText lid.176 lite or langid.py); adds their language and score."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """Heuristic quality rules (datatrove's Gopher quality/repetition, C4, FineWeb), in FineWeb's settings."""
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    """Exact dedup of normalised text."""
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    """MinHash LSH near dedup (word shingles, bands x rows); keeps the first document of each cluster."""
    pii: PIIConfig = field(default_factory=PIIConfig)
    """PII redaction (Presidio): e-mails, phones, IPs, card numbers, IBANs replaced by <EMAIL>-style placeholders."""
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    """Toxicity filter: alt-profanity-check's linear model per paragraph; the worst paragraph's score decides."""
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    """Bits per byte under a language model; remove documents above max_bits_per_byte."""
    perplexity_buckets: PerplexityBucketsConfig = field(default_factory=PerplexityBucketsConfig)
    """CCNet head/middle/tail buckets of bits per byte, cut at corpus quantiles; keep the listed buckets."""
    decontaminate: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    """Remove documents sharing a 13-gram with an evaluation set (stdlib-mc, stdlib-doctest, humaneval, mc:/gen:)."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    """Where the work runs: local processes or a Dask cluster."""

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give at least one file, folder or glob")
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ValueError(f"steps: unknown {unknown}; expected some of {', '.join(STEPS)}")
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"steps: each step at most once, found {self.steps}")
        if self.partition_mb <= 0 or self.max_doc_mb <= 0:
            raise ValueError(f"partition_mb and max_doc_mb must be > 0, found {self.partition_mb}, {self.max_doc_mb}")


def main(cfg: Config) -> int:
    from ..config import config_hash
    from ..curate.executors import executor
    from ..curate.run import curate
    from ..curate.steps import CORPUS_STEPS, build
    steps = [(name, getattr(cfg, name)) for name in cfg.steps]
    with executor(cfg.executor) as map_tasks:
        report = curate(cfg.inputs, cfg.output, steps, build, CORPUS_STEPS, map_tasks, include=cfg.include,
                        exclude=cfg.exclude, text_key=cfg.text_key, partition_bytes=int(cfg.partition_mb * 2**20),
                        max_doc_bytes=int(cfg.max_doc_mb * 2**20), data_format=cfg.format,
                        fingerprint=_fingerprint(cfg, config_hash))
    print(summary(report))
    print(f"curated documents: {cfg.output}/data (removed: {cfg.output}/removed, counts: {cfg.output}/curate.json)")
    return 0


def _fingerprint(cfg: Config, config_hash) -> str:
    """What makes earlier work reusable: everything but where it runs."""
    import dataclasses

    return config_hash(dataclasses.replace(cfg, executor=ExecutorConfig()))


def summary(report: dict) -> str:
    """The funnel as text: documents into each step, removed by reason."""
    lines = [f"curate: {report['documents']:,} documents read, {report['kept']:,} kept, {report['removed']:,} "
             f"removed in {report['seconds']:.1f} s"]
    for s in report["steps"]:
        why = ", ".join(f"{k} {v:,}" for k, v in sorted(s["removed"].items(), key=lambda kv: -kv[1]))
        extra = ", ".join(f"{k} {v:,}" for k, v in s["extra"].items())
        lines.append(f"  {s['step']:<16} {s['docs_in']:>9,} in  {s['kept']:>9,} kept  {s['seconds']:7.1f} s"
                     + (f"  removed: {why}" if why else "") + (f"  ({extra})" if extra else ""))
    return "\n".join(lines)
