"""A pipeline's bars (`lmforge pipeline`, stages/pipeline.py): what each stage must achieve, stated in the pipeline
YAML as a number read from a JSON file a stage wrote, compared with a constant or with another stage's number, and
checked when the pipeline ends. The verdicts go to the console (a table), to pipeline.json and to the report.

    bars:
      - stage: sft
        what: "held-out answer F1 above the base model's by more than 2 standard errors"
        value: eval-sft/eval.json:tasks.stdlib-doc.f1          # STAGE_FOLDER/FILE:KEY.PATH
        above: eval-base/eval.json:tasks.stdlib-doc.f1         # or a number
        stderrs: 2

A value's standard error, where the file has one, is read from the same path with `_stderr` appended
(`tasks.stdlib-doc.f1_stderr`). With `stderrs: k` the value must clear the reference by more than
k·√(se² + se_ref²) (the standard error of a difference of independent estimates); a negative k lets it fall short
by less than |k| of them ("not lower beyond noise"); without, a plain ≥ / ≤.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Bar", "check_bars"]


@dataclass
class Bar:
    """A number a stage must reach, checked when the pipeline ends."""

    stage: str
    """The stage it judges (the table's first column)."""
    what: str
    """What it checks, in words."""
    value: str
    """The measured number: FOLDER/FILE.json:KEY.PATH, a JSON file in the pipeline's folder and a dotted key path
    into it (list items by their index)."""
    above: float | str | None = None
    """The value must be at least this: a number, or a FOLDER/FILE.json:KEY.PATH as `value`."""
    below: float | str | None = None
    """The value must be at most this: a number, or a FOLDER/FILE.json:KEY.PATH as `value`."""
    times: float = 1.0
    """The reference is multiplied by this (within +5% of X: below X with times 1.05)."""
    stderrs: float = 0.0
    """The value must clear the reference by more than this many standard errors of their difference; negative:
    it may fall short of it by less than that many (not lower beyond noise); 0: a plain >= / <=."""

    def validate(self) -> None:
        if (self.above is None) == (self.below is None):
            raise ValueError(f"bar {self.what!r}: give exactly one of above and below")
        for ref in (self.value, self.above if self.above is not None else self.below):
            if not _is_number(ref) and ":" not in str(ref):
                raise ValueError(f"bar {self.what!r}: {ref!r} is neither a number nor FOLDER/FILE.json:KEY.PATH")
        if self.times <= 0:
            raise ValueError(f"bar {self.what!r}: times must be > 0, found {self.times}")


def _is_number(ref: float | str) -> bool:
    try:
        float(ref)
    except ValueError:
        return False
    return True


def _lookup(run: Path, ref: float | str) -> tuple[float, float | None]:
    """(value, standard error or None) of a number, or of FOLDER/FILE:KEY.PATH under `run`."""
    if _is_number(ref):
        return float(ref), None
    file, _, path = ref.partition(":")
    try:
        node: Any = json.loads((run / file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise LookupError(f"{file} cannot be read ({type(e).__name__})") from None
    keys = path.split(".")
    parent = None
    for key in keys:
        parent = node
        try:
            node = node[int(key)] if isinstance(node, list) else node[key]
        except (KeyError, IndexError, ValueError, TypeError):
            raise LookupError(f"{file} has no {path!r} (no key {key!r})") from None
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise LookupError(f"{file}:{path} is {type(node).__name__} {node!r:.40}, expected a number")
    err = parent.get(keys[-1] + "_stderr") if isinstance(parent, dict) else None
    return float(node), float(err) if isinstance(err, (int, float)) and math.isfinite(err) else None


def check_bars(bars: list[Bar], run: Path) -> list[dict[str, Any]]:
    """Each bar's verdict: value and its standard error, the reference and its own, the margin it needed, pass,
    and the `measured` / `needed` text the console table and the report show."""
    out = []
    for bar in bars:
        above = bar.above is not None
        row: dict[str, Any] = {"stage": bar.stage, "what": bar.what, "op": ">=" if above else "<="}
        try:
            v, se = _lookup(run, bar.value)
            r, se_r = _lookup(run, bar.above if above else bar.below)
        except LookupError as e:
            out.append({**row, "pass": False, "error": str(e), "measured": "not measured", "needed": str(e)})
            continue
        r, se_r = r * bar.times, None if se_r is None else se_r * bar.times
        margin = bar.stderrs * math.sqrt((se or 0.0) ** 2 + (se_r or 0.0) ** 2)
        ok = (v - r > margin if bar.stderrs else v >= r) if above else (r - v > margin if bar.stderrs else v <= r)
        need = f"{row['op']} {_num(r, se_r)}"
        if bar.stderrs:
            need += f" by > {bar.stderrs:g} s.e. ({margin:.2g})" if bar.stderrs > 0 else \
                f" less {-bar.stderrs:g} s.e. ({-margin:.2g})"
        out.append({**row, "value": v, "stderr": se, "reference": r, "reference_stderr": se_r, "margin": margin,
                    "stderrs": bar.stderrs, "pass": ok, "measured": _num(v, se), "needed": need})
    return out


def _num(v: float, se: float | None = None) -> str:
    text = f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return text + (f" ± {se:.2g}" if se else "")

