"""Errors about what the user gave (files, records, settings), and how the command line reports any error.

Floor 0: no lmforge imports. Loaders raise `InputError` with a message that names the file (and key, line or
tensor), what was found and what was expected; `lmforge.cli` prints it as one line and exits with status 2.
Anything else is a runtime failure: one line too, status 1, and the traceback only on request (`--debug` or
LMFORGE_DEBUG=1).
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["InputError", "one_line", "debug_requested", "read_json_object", "DEBUG_ENV"]

DEBUG_ENV = "LMFORGE_DEBUG"
"""Environment variable that makes the command line print tracebacks (any value but '', '0', 'false', 'no')."""

_MAX_LINE = 2000


class InputError(ValueError):
    """A file, record or setting the user gave is wrong; the message says which, what was found and what was
    expected (the command line exits with status 2)."""


def one_line(text: str) -> str:
    """`text` on a single line (inner line breaks become '; ', blanks are dropped), cut to a readable length."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    line = "; ".join(parts)
    return line if len(line) <= _MAX_LINE else line[:_MAX_LINE - 3] + "..."


def debug_requested() -> bool:
    """True when LMFORGE_DEBUG asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def read_json_object(path: str | os.PathLike, expected: str = "a JSON object") -> dict[str, Any]:
    """A JSON file holding one object (config.json, tokenizer_config.json, an index); InputError naming the file
    and the line and column for bytes that are not UTF-8 JSON of an object."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: byte {e.start} is not UTF-8 ({e.reason}); expected {expected}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}; expected {expected}") \
            from None
    except RecursionError:
        raise InputError(f"{path}: JSON nested too deeply; expected {expected}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: found a JSON {type(data).__name__}, expected {expected}")
    return data
