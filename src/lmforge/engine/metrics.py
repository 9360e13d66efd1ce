"""One metrics sink: metrics.jsonl (one JSON object per logged step) and TensorBoard events, from rank 0.

Appends are not fsynced one by one (a kill may cut the last one short): readers skip a line that does not parse, a
resume rewrites the file atomically without it, and `sync` makes the rows durable before a checkpoint is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ..atomic import write_text

log = logging.getLogger(__name__)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


class MetricsSink:
    """Append-only metrics log; `enabled=False` on non-zero ranks."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only "
                            "(pip install tensorboard)")

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if not self.enabled:
            return row
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        return row

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run re-logs them, so the file has each step once) and any torn
        line; the file is rewritten atomically."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line, row in _lines(self.path) if row.get("step", 0) <= step]
        write_text(self.path, "".join(line + "\n" for line in keep))

    def clear(self) -> None:
        """Start metrics.jsonl empty (a run that starts without a checkpoint logs every step afresh)."""
        if self.enabled and self.path.exists():
            write_text(self.path, "")

    def row(self, step: int) -> dict[str, Any]:
        """What was logged at `step` (rows of that step merged; empty when none)."""
        if not self.enabled or not self.path.exists():
            return {}
        return {k: v for _, row in _lines(self.path) if row.get("step") == step for k, v in row.items()}

    def sync(self) -> None:
        """fsync metrics.jsonl, so that the rows of the steps a checkpoint covers last as long as the checkpoint."""
        if self.enabled and self.path.exists():
            with self.path.open("rb") as f:
                os.fsync(f.fileno())

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of each row of a metrics.jsonl; a line that does not parse (the torn end of an append that a
    kill cut short) is skipped with a warning."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping a torn metrics row (%.60s)", path, n, line)
            continue
        if isinstance(row, dict):
            out.append((line, row))
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (a torn line is skipped)."""
    return [row for _, row in _lines(Path(run_dir) / "metrics.jsonl")]
