"""One progress bar for long work (rich when on a terminal, quiet otherwise)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class _Bar:
    def __init__(self, progress, task):
        self._p, self._t = progress, task

    def advance(self, n: float = 1, **fields) -> None:
        """Move the bar by n units; `fields` update the text shown after it (e.g. loss=2.31)."""
        if self._p is not None:
            text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            self._p.update(self._t, advance=n, **({"info": text} if fields else {}))

    def update(self, completed: float) -> None:
        if self._p is not None:
            self._p.update(self._t, completed=completed)


@contextmanager
def progress(total: float | None, description: str, unit: str = "", enabled: bool = True,
             completed: float = 0) -> Iterator[_Bar]:
    """A progress bar over `total` units; disabled off a terminal (CI, logs) or when `enabled` is False."""
    if not enabled or not sys.stderr.isatty():
        yield _Bar(None, None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*cols, transient=False) as p:
        task = p.add_task(description, total=total, completed=completed, info="")
        yield _Bar(p, task)
