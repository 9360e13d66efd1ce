"""Stream documents from JSONL (.jsonl, .jsonl.gz), Parquet, plain text files, directories and globs.

Order is deterministic (inputs in the order given; directory and glob matches sorted), nothing is loaded whole,
and bad records stop with the file, line, what was found and what was expected.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["Document", "DataError", "ReadStats", "iter_documents", "iter_records", "expand_inputs", "read_file",
           "require_validation", "replaced_note", "decode_utf8", "record_keys", "record_string", "TEXT_SUFFIXES"]

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
"""Plain-text files picked up from directories when no `include` patterns are given (one document per file)."""
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".parquet")
_GLOB_CHARS = set("*?[")


OnBad = Callable[[str, str, str, str], None]
"""Called for a bad record instead of raising: (``file:line``, reason, message, the record's text or an excerpt)."""


class DataError(InputError):
    """Bad input data: the message names the file, the line (or row), what was found and what was expected."""


@dataclass(frozen=True)
class Document:
    """One document: its text, optional id, and where it came from (``file:line`` or ``file``)."""

    text: str
    id: str | None
    source: str
    meta: Any = None


@dataclass
class ReadStats:
    """Counters filled while reading: files opened, documents yielded, empty ones skipped, bytes replaced."""

    files: int = 0
    documents: int = 0
    empty: int = 0
    replaced: int = 0
    """Undecodable UTF-8 sequences replaced by U+FFFD."""
    replaced_files: list[str] = field(default_factory=list)


def replaced_note(stats: ReadStats) -> str:
    """The words every stage uses to report undecodable input ("" when there was none): how many byte sequences
    were replaced by U+FFFD and the first file (and line) that had one."""
    if not stats.replaced:
        return ""
    return f"{stats.replaced} undecodable byte sequences replaced by U+FFFD (first: {stats.replaced_files[0]})"


def record_keys(obj: Any) -> str:
    """The keys of a record as an error message shows them (the first 12; "none"), or what it is when not an
    object ("a list")."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    return ", ".join(map(repr, list(obj)[:12])) or "none"


def record_string(record: dict[str, Any], key: str, where: str, what: str | None = None) -> str:
    """The non-empty string `record[key]`, else a one-line DataError at `where` naming the key (and `what` it
    holds), what was found and what was expected."""
    label = f"{what} {key!r}" if what else repr(key)
    if key not in record or record[key] is None:
        raise DataError(f"{where}: no {key!r} field (found keys {record_keys(record)}); expected the {what or key} "
                        f"as a string")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {label} is {type(value).__name__} {str(value)[:40]!r}, expected a string")
    if not value.strip():
        raise DataError(f"{where}: {label} is empty, expected a non-empty string")
    return value


def require_validation(examples: Sequence[Any], data: Any) -> None:
    """DataError when a stage's validation split is empty; `data` is its data section (train, validation,
    validation_fraction), named in the message so the user knows which setting to change."""
    if examples:
        return
    source = (f"data.validation {list(data.validation)}" if data.validation else
              f"data.validation_fraction {data.validation_fraction} of data.train {list(data.train)}")
    raise DataError(f"the validation split is empty ({source} gave no example); expected at least one: add "
                    f"data.validation files or raise data.validation_fraction")


def _matches(path: Path, patterns: Sequence[str]) -> bool:
    posix = path.as_posix()
    return any(fnmatch.fnmatch(path.name, p) or fnmatch.fnmatch(posix, p) for p in patterns)


def _known(path: Path) -> bool:
    return path.name.endswith(RECORD_SUFFIXES + TEXT_SUFFIXES)


def _walk(root: Path, include: Sequence[str] | None, exclude: Sequence[str]) -> list[Path]:
    """Files under `root`, recursive, sorted; hidden files and folders are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith(".") or _matches(p, exclude):
                continue
            if (_matches(p, include) if include else _known(p)):
                found.append(p)
    return found


_PKG = re.compile(r"\{pkg:([A-Za-z0-9_.]+)\}")


def expand_placeholders(path: str) -> str:
    """`{stdlib}` becomes this Python's standard library folder (a real code corpus on every machine);
    `{pkg:NAME}` the folder of the installed package NAME (found without importing it); `{align}` the folder of
    the alignment datasets built from real data on this machine (`data/align_data.py`, built on first use into
    $LMFORGE_CACHE/align, default ~/.cache/lmforge/align); `{qa}` that of the extractive-QA set built from the
    standard library's docstrings (`data/qa_data.py`, likewise into $LMFORGE_CACHE/qa)."""
    if "{stdlib}" in path:
        import sysconfig

        path = path.replace("{stdlib}", sysconfig.get_paths()["stdlib"])
    if "{align}" in path:
        from .align_data import ensure_align_data

        cache = Path(os.environ.get("LMFORGE_CACHE", "~/.cache/lmforge")).expanduser()
        folder = ensure_align_data(cache / "align", progress=lambda msg: print(f"{{align}} ({cache / 'align'}, built "
                                                                                f"on first use): {msg}", flush=True))
        path = path.replace("{align}", str(folder))
    if "{qa}" in path:
        from .qa_data import ensure_qa_data

        cache = Path(os.environ.get("LMFORGE_CACHE", "~/.cache/lmforge")).expanduser()
        folder = ensure_qa_data(cache / "qa", progress=lambda msg: print(f"{{qa}} ({cache / 'qa'}, built on first "
                                                                          f"use): {msg}", flush=True))
        path = path.replace("{qa}", str(folder))
    for name in _PKG.findall(path):
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"input {path!r}: package {name!r} is not installed (or is not a package)")
        path = path.replace(f"{{pkg:{name}}}", list(spec.submodule_search_locations)[0])
    return path


def expand_inputs(paths: str | os.PathLike | Sequence[str | os.PathLike], include: Sequence[str] | None = None,
                  exclude: Sequence[str] = ()) -> list[Path]:
    """Files named by `paths` (files, directories, shell globs), in a deterministic order.

    Files named directly are always read; directory and glob matches are filtered by `include` / `exclude`
    patterns (matched against the file name and the full path, e.g. ``*.py``, ``*/tests/*``).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for spec in paths:
        spec = expand_placeholders(str(spec))
        p = Path(spec).expanduser()
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out += _walk(p, include, exclude)
        elif _GLOB_CHARS & set(str(spec)):
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise FileNotFoundError(f"input {str(spec)!r}: no file matches this pattern")
            for m in map(Path, matches):
                if m.is_dir():
                    out += _walk(m, include, exclude)
                elif not _matches(m, exclude) and (not include or _matches(m, include)):
                    out.append(m)
        else:
            raise FileNotFoundError(f"input {str(spec)!r} not found: expected a file, a directory or a glob")
    return out


def decode_utf8(raw: bytes, where: str, stats: ReadStats) -> str:
    """`raw` as UTF-8 text; undecodable sequences become U+FFFD and are counted in `stats` (with `where`)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        stats.replaced += text.count("\ufffd") - raw.count("\ufffd".encode())
        stats.replaced_files.append(where)
        return text


def _record(obj: Any, text_key: str, where: str) -> tuple[str, str | None, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: found a JSON {type(obj).__name__}, expected an object like "
                        f'{{"{text_key}": "...", "id": "..."}}')
    if text_key not in obj:
        keys = ", ".join(map(repr, list(obj)[:8])) or "none"
        raise DataError(f"{where}: no {text_key!r} key (found keys {keys}); expected a string field {text_key!r} "
                        f"(set text_key to read another field)")
    text = obj[text_key]
    if not isinstance(text, str):
        raise DataError(f"{where}: {text_key!r} is {type(text).__name__} {str(text)[:40]!r}, expected a string")
    doc_id = obj.get("id")
    return text, (None if doc_id is None else str(doc_id)), obj.get("meta")


def _lines(f, max_bytes: int | None) -> Iterator[tuple[bytes, bool]]:
    """(line, whole) of a binary file; a line longer than max_bytes comes as its first max_bytes with whole=False
    (the rest is skipped unread into memory)."""
    if max_bytes is None:
        for raw in f:
            yield raw, True
        return
    while raw := f.readline(max_bytes + 1):
        if len(raw) <= max_bytes or raw.endswith(b"\n"):
            yield raw, True
            continue
        while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
            pass
        yield raw[:max_bytes], False


def _jsonl_objects(path: Path, stats: ReadStats, on_bad: OnBad | None = None,
                   max_bytes: int | None = None) -> Iterator[tuple[str, Any]]:
    """(``file:line``, parsed JSON) of every non-blank line; a bad line raises DataError, or with `on_bad` is
    reported to it and skipped."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, (raw, whole) in enumerate(_lines(f, max_bytes), 1):
            where = f"{path}:{lineno}"
            line = decode_utf8(raw, where, stats)
            if not whole:
                _bad(on_bad, where, "too_large", f"a line over {max_bytes:,} bytes; expected at most max_doc_bytes",
                     line)
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                shown = line.strip()[:60]
                _bad(on_bad, where, "malformed_json", f"malformed JSON ({e.msg} at column {e.colno}) in {shown!r}; "
                     f"expected one JSON object per line", line)


def _bad(on_bad: OnBad | None, where: str, reason: str, message: str, text: str) -> None:
    if on_bad is None:
        raise DataError(f"{where}: {message}")
    on_bad(where, reason, message, text)


def _read_jsonl(path: Path, text_key: str, stats: ReadStats, on_bad: OnBad | None = None,
                max_bytes: int | None = None) -> Iterator[Document]:
    for where, obj in _jsonl_objects(path, stats, on_bad, max_bytes):
        try:
            text, doc_id, meta = _record(obj, text_key, where)
        except DataError as e:
            _bad(on_bad, where, "bad_record", str(e).removeprefix(f"{where}: "), json.dumps(obj)[:1000])
            continue
        yield Document(text, doc_id, where, meta)


def _read_parquet(path: Path, text_key: str, batch_rows: int = 1024) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_key not in names:
        raise DataError(f"{path}: no {text_key!r} column (found {', '.join(names)}); expected a string column "
                        f"{text_key!r}")
    cols = [c for c in (text_key, "id", "meta") if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            row += 1
            text, doc_id, meta = _record({c: data[c][i] for c in cols}, text_key, f"{path}:row {row}")
            if isinstance(meta, str) and meta.startswith("{"):  # a meta column of JSON text (curate writes one)
                try:
                    meta = json.loads(meta)
                except ValueError:
                    pass
            yield Document(text, doc_id, f"{path}:{row}", meta)


def read_file(path: Path, text_key: str = "text", stats: ReadStats | None = None, on_bad: OnBad | None = None,
              max_bytes: int | None = None) -> Iterator[Document]:
    """The documents of one file (empty ones included): JSONL(.gz) and Parquet records, or the whole file as one
    text document. Without `on_bad` a bad record raises DataError; with it, every bad record (malformed JSON, no
    text field, a line or file over `max_bytes`) is reported as `on_bad(where, reason, message, text)` and skipped,
    so a caller can count and keep it."""
    stats = stats if stats is not None else ReadStats()
    stats.files += 1
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        yield from _read_jsonl(path, text_key, stats, on_bad, max_bytes)
    elif name.endswith(".parquet"):
        yield from _read_parquet(path, text_key)
    elif max_bytes is not None and path.stat().st_size > max_bytes:
        _bad(on_bad, str(path), "too_large", f"{path.stat().st_size:,} bytes; expected at most max_doc_bytes "
             f"({max_bytes:,})", "")
    else:
        yield Document(decode_utf8(path.read_bytes(), str(path), stats), None, str(path))


def iter_documents(paths: str | os.PathLike | Sequence[str | os.PathLike], text_key: str = "text",
                   include: Sequence[str] | None = None, exclude: Sequence[str] = (),
                   stats: ReadStats | None = None) -> Iterator[Document]:
    """Stream the non-empty documents of `paths`; raises DataError ("empty corpus") if there are none."""
    stats = stats if stats is not None else ReadStats()
    files = expand_inputs(paths, include, exclude)
    for path in files:
        for doc in read_file(path, text_key, stats):
            if not doc.text:
                stats.empty += 1
                continue
            stats.documents += 1
            yield doc
    if stats.documents == 0:
        shown = ", ".join(map(str, paths if not isinstance(paths, (str, os.PathLike)) else [paths]))
        filt = f" (include {list(include)}, exclude {list(exclude)})" if include or exclude else ""
        raise DataError(f"empty corpus: inputs [{shown}]{filt} gave no documents ({len(files)} files matched, "
                        f"{stats.empty} empty documents skipped)")


def _read_csv(path: Path, stats: ReadStats) -> Iterator[tuple[str, dict[str, Any]]]:
    import csv
    import io

    text = decode_utf8(path.read_bytes(), str(path), stats)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: no header row; expected a CSV file whose first line names the columns")
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise DataError(f"{where}: {len(reader.fieldnames) + len(row[None])} fields, expected "
                            f"{len(reader.fieldnames)} (the header's {', '.join(reader.fieldnames)})")
        yield where, row


def iter_records(paths: str | os.PathLike | Sequence[str | os.PathLike], include: Sequence[str] | None = None,
                 exclude: Sequence[str] = (), stats: ReadStats | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream `(where, record)` pairs from JSONL, Parquet and CSV files (`where` is ``file:line`` or
    ``file:row N``); every record must be an object. Raises DataError when the inputs hold no record."""
    stats = stats if stats is not None else ReadStats()
    files = expand_inputs(paths, include or ["*.jsonl", "*.jsonl.gz", "*.ndjson", "*.parquet", "*.csv"], exclude)
    n = 0
    for path in files:
        stats.files += 1
        name = path.name
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            for where, obj in _jsonl_objects(path, stats):
                if not isinstance(obj, dict):
                    raise DataError(f"{where}: found a JSON {type(obj).__name__}, expected an object")
                n += 1
                yield where, obj
        elif name.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
            row = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                for obj in batch.to_pylist():
                    row += 1
                    n += 1
                    yield f"{path}:row {row}", obj
        elif name.endswith(".csv"):
            for where, obj in _read_csv(path, stats):
                n += 1
                yield where, obj
        else:
            raise DataError(f"{path}: unsupported record file; expected .jsonl, .jsonl.gz, .ndjson, .parquet or .csv")
    stats.documents = n
    if n == 0:
        shown = ", ".join(map(str, paths if not isinstance(paths, (str, os.PathLike)) else [paths]))
        raise DataError(f"no records in [{shown}] ({len(files)} files matched)")
