"""`lmforge report RUN_DIR`: one self-contained HTML page of a run (a pipeline folder or one stage's run
directory) -- curves, evaluation tables before / after, lineage, resolved configs -- and a text summary on the
terminal. The page is built by `report.py`."""

from __future__ import annotations

from dataclasses import dataclass

POSITIONAL = ("run_dir",)


@dataclass
class Config:
    run_dir: str
    """A pipeline folder (pipeline.json) or a run directory (metrics.jsonl, eval.json)."""
    output: str | None = None
    """Where to write the HTML page (default: RUN_DIR/report.html)."""


def main(cfg: Config) -> int:
    from ..report import write_report

    path, summary = write_report(cfg.run_dir, cfg.output)
    print(summary)
    print(f"report: {path}")
    return 0
