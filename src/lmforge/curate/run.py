"""A curation run: the corpus split into partitions (groups of whole input files, in input order), the steps run
over them in phases, and everything written so nothing is lost and a re-run resumes.

The recipe's steps are cut into phases at each `CorpusStep` step. Phase k, one task per partition (in a worker):
drop the documents the previous dedup named, run the phase's filters, and either compute the next dedup's keys
(survivors go to `work/phase-k/`) or, in the last phase, write the kept documents to `data/part-NNNNN.jsonl.gz`
(or `.parquet`).
Between phases the driver runs the dedup over the keys of every partition in corpus order. Every removed document
goes to `removed/` with the step and reason; bad input (malformed JSON, a record without text, an empty or
oversized document) goes there too, under step `input`, with its file:line. A task's files are written
atomically and its counts last, so a killed run redoes only unfinished tasks; `curate.json` sums the counts.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..atomic import write_file, write_text
from ..data.readers import ReadStats, expand_inputs, read_file
from .base import Counts, CorpusStep, Doc, Filter

__all__ = ["Partition", "Task", "plan_partitions", "run_task", "phases", "merge_counts"]

INPUT = "input"
"""The pseudo-step that removes bad input records (counted and kept in removed/, never silently dropped)."""


@dataclass
class Partition:
    """Whole input files read by one task, in corpus order."""

    index: int
    files: list[str]


@dataclass
class Task:
    """One partition through one phase: everything a worker needs (it pickles; steps are built in the worker)."""

    partition: Partition
    phase: int
    filters: list[tuple[str, Any]]
    """The phase's filters as (name, config)."""
    dedup: tuple[str, Any] | None
    """The dedup that ends the phase (its keys are computed here), or None in the last phase."""
    previous: str | None
    """The dedup that ended the previous phase (its removals are applied first), or None in phase 0."""
    builder: Callable[[str, Any], Any]
    """(name, config) -> the step: a Filter or a CorpusStep."""
    out: str
    text_key: str = "text"
    max_doc_bytes: int | None = None
    data_format: str = "jsonl"
    """How kept documents are written: jsonl (part-NNNNN.jsonl.gz) or parquet (part-NNNNN.parquet)."""


def plan_partitions(inputs: list[str], include: list[str] | None, exclude: list[str],
                    target_bytes: int) -> list[Partition]:
    """Consecutive groups of input files of about `target_bytes` each (a larger file is a partition of its own)."""
    parts: list[Partition] = []
    group: list[str] = []
    size = 0
    for path in expand_inputs(inputs, include, exclude):
        group.append(str(path))
        size += path.stat().st_size
        if size >= target_bytes:
            parts.append(Partition(len(parts), group))
            group, size = [], 0
    if group:
        parts.append(Partition(len(parts), group))
    return parts


Step = tuple[str, Any]
"""A step of the recipe: (name, config)."""


def phases(steps: list[Step], dedups: set[str]) -> list[tuple[list[Step], Step | None]]:
    """[(the phase's filters, the dedup that ends it or None)] for the recipe's steps."""
    out: list[tuple[list[tuple[str, Any]], tuple[str, Any] | None]] = []
    filters: list[tuple[str, Any]] = []
    for name, cfg in steps:
        if name in dedups:
            out.append((filters, (name, cfg)))
            filters = []
        else:
            filters.append((name, cfg))
    out.append((filters, None))
    return out


_BUILT: dict[str, Any] = {}  # steps built in this worker process, by config fingerprint (models load once)


def _step(task: Task, name: str, cfg: Any) -> Any:
    key = hashlib.sha256(repr((name, cfg)).encode()).hexdigest()
    if key not in _BUILT:
        _BUILT[key] = task.builder(name, cfg)
    return _BUILT[key]


def _paths(out: Path, phase: int, index: int) -> dict[str, Path]:
    return {"kept": out / "work" / f"phase-{phase}" / f"part-{index:05d}.jsonl.gz",
            "keys": out / "work" / f"phase-{phase}" / f"keys-{index:05d}.npy",
            "ids": out / "work" / f"phase-{phase}" / f"ids-{index:05d}.json",
            "counts": out / "work" / f"phase-{phase}" / f"counts-{index:05d}.json",
            "removed": out / "removed" / f"phase-{phase}-part-{index:05d}.jsonl.gz",
            "jsonl": out / "data" / f"part-{index:05d}.jsonl.gz",
            "parquet": out / "data" / f"part-{index:05d}.parquet",
            "dups": out / "work" / f"dedup-{phase}.json"}


def _read_raw(task: Task, removed: list[dict[str, Any]], counts: Counts) -> list[Doc]:
    """The partition's documents; bad records go to `removed` under step `input`."""
    stats = ReadStats()

    def bad(where: str, reason: str, message: str, text: str) -> None:
        removed.append({"key": where, "id": where, "text": text, "step": INPUT, "reason": reason,
                        "message": message})
        counts.removed[reason] = counts.removed.get(reason, 0) + 1
        counts.docs_in += 1

    docs = []
    for path in task.partition.files:
        for d in read_file(Path(path), task.text_key, stats, on_bad=bad, max_bytes=task.max_doc_bytes):
            counts.docs_in += 1
            counts.bytes_in += _nbytes(d.text)
            if not d.text.strip():
                bad(d.source, "empty", "an empty document", d.text)
                counts.docs_in -= 1
                continue
            meta = dict(d.meta) if isinstance(d.meta, dict) else ({} if d.meta is None else {"meta": d.meta})
            docs.append(Doc(d.source, d.text, d.id if d.id is not None else d.source, meta))
    counts.kept = len(docs)
    if stats.replaced:
        counts.extra["utf8_replaced"] = stats.replaced
    return docs


def _jsonl_gz(records: list[dict[str, Any]]) -> Callable[[Path], None]:
    """A writer (for `atomic.write_file`) of the records as gzipped JSON lines (no timestamp: same bytes each run)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            for r in records:
                f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass"))
    return write


def _parquet(records: list[dict[str, Any]]) -> Callable[[Path], None]:
    """A writer of the records as one Parquet file: columns id, text and meta (JSON text, as records vary)."""
    def write(tmp: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"id": [str(r["id"]) for r in records], "text": [r["text"] for r in records],
                          "meta": [json.dumps(r["meta"], ensure_ascii=False) for r in records]},
                         schema=pa.schema([("id", pa.string()), ("text", pa.string()), ("meta", pa.string())]))
        pq.write_table(table, tmp)
    return write


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would add .npy to a path
        np.save(f, array, allow_pickle=False)


def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8", errors="surrogatepass") as f:
        return [json.loads(line) for line in f]


def run_task(task: Task) -> dict[str, dict[str, Any]]:
    """Run one partition through one phase; returns (and writes, last) the counts per step. A task whose counts
    file exists finished before and is not run again."""
    out = Path(task.out)
    p = _paths(out, task.phase, task.partition.index)
    if p["counts"].exists():
        return json.loads(p["counts"].read_text())
    removed: list[dict[str, Any]] = []
    counts: dict[str, Counts] = {}
    if task.previous is None:
        c = counts[INPUT] = Counts()
        t0 = time.perf_counter()
        docs = _read_raw(task, removed, c)
        c.seconds = time.perf_counter() - t0
    else:
        prev = _paths(out, task.phase - 1, task.partition.index)
        docs = [Doc(**r) for r in read_jsonl_gz(prev["kept"])]
        dups = json.loads(prev["dups"].read_text())
        name = task.previous
        c = counts[name] = Counts(docs_in=len(docs), bytes_in=sum(map(_nbytes, (d.text for d in docs))))
        t0 = time.perf_counter()
        keep = []
        for d in docs:
            if d.key not in dups:
                keep.append(d)
                continue
            reason, related = dups[d.key]
            removed.append({**_record(d), "step": name, "reason": reason, **({"duplicate_of": related}
                                                                                if related else {})})
            c.removed[reason] = c.removed.get(reason, 0) + 1
        docs, c.kept, c.seconds = keep, len(keep), time.perf_counter() - t0
    for name, cfg in task.filters:
        docs = _filter(_step(task, name, cfg), name, docs, removed, counts)
    if removed:
        write_file(p["removed"], _jsonl_gz(removed))
    if task.dedup is None:
        kept = [{"id": d.id, "text": d.text, "meta": {**d.meta, "source": d.key}} for d in docs]
        writer = _parquet if task.data_format == "parquet" else _jsonl_gz
        write_file(p[task.data_format], writer(kept))
    else:
        step = _step(task, *task.dedup)
        t0 = time.perf_counter()
        keys = step.keys(docs) if docs else np.zeros((0, 1), dtype=np.uint64)
        counts[task.dedup[0]] = Counts(seconds=time.perf_counter() - t0)  # its documents are counted next phase
        write_file(p["keys"], lambda tmp: _save_npy(tmp, np.asarray(keys, dtype=np.uint64)))
        write_text(p["ids"], json.dumps([d.key for d in docs]))  # what the driver needs, without the texts
        write_file(p["kept"], _jsonl_gz([_record(d) for d in docs]))
    result = {name: c.__dict__ for name, c in counts.items()}
    write_text(p["counts"], json.dumps(result))
    return result


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _record(d: Doc) -> dict[str, Any]:
    return {"key": d.key, "text": d.text, "id": d.id, "meta": d.meta}


def _filter(step: Filter, name: str, docs: list[Doc], removed: list[dict[str, Any]],
            counts: dict[str, Counts]) -> list[Doc]:
    c = counts[name] = Counts(docs_in=len(docs), bytes_in=sum(map(_nbytes, (d.text for d in docs))))
    t0 = time.perf_counter()
    verdicts = step(docs) if docs else []
    keep = []
    for d, v in zip(docs, verdicts):
        if v is None:
            keep.append(d)
        else:
            removed.append({**_record(d), "step": name, "reason": v})
            c.removed[v] = c.removed.get(v, 0) + 1
    c.kept, c.seconds, c.extra = len(keep), time.perf_counter() - t0, dict(step.extra())
    return keep


def dedup_between(out: Path, phase: int, n_parts: int, step: CorpusStep) -> dict[str, tuple[str, str]]:
    """Run a dedup over the keys of every partition (corpus order) and write work/dedup-PHASE.json."""
    path = out / "work" / f"dedup-{phase}.json"
    if path.exists():
        return json.loads(path.read_text())
    doc_keys: list[str] = []
    arrays = []
    for i in range(n_parts):
        p = _paths(out, phase, i)
        doc_keys += json.loads(p["ids"].read_text())
        arrays.append(np.load(p["keys"], allow_pickle=False))
    width = max((a.shape[1] for a in arrays if a.size), default=1)
    keys = np.concatenate([a.reshape(-1, width) for a in arrays]) if doc_keys else np.zeros((0, width), np.uint64)
    dups = step.duplicates(doc_keys, keys)
    write_text(path, json.dumps(dups))
    return dups


def merge_counts(results: list[dict[str, dict[str, Any]]]) -> dict[str, Counts]:
    """The per-step counts of every task, summed (steps in the order they first appear)."""
    total: dict[str, Counts] = {}
    for r in results:
        for name, c in r.items():
            total.setdefault(name, Counts()).add(Counts(**c))
    return total


def curate(inputs: list[str], out: str | Path, steps: list[tuple[str, Any]], builder: Callable[[str, Any], Any],
           dedups: set[str], map_tasks: Callable, *, include: list[str] | None = None, exclude: list[str] = (),
           text_key: str = "text", partition_bytes: int = 32 << 20, max_doc_bytes: int | None = None,
           data_format: str = "jsonl", fingerprint: str = "") -> dict[str, Any]:
    """Run the steps over the inputs into `out` (data/, removed/, work/, curate.json) and return curate.json.
    `map_tasks(run_task, tasks, description)` is the executor's map. Work left by a run with another
    `fingerprint` (config) is cleared first; work of the same one is reused."""
    out = Path(out)
    marker = out / "work" / "fingerprint"
    if marker.exists() and marker.read_text() != fingerprint:
        from ..atomic import remove_folder

        for sub in ("work", "data", "removed"):
            if (out / sub).exists():
                remove_folder(out / sub)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_text(marker, fingerprint)
    t0 = time.perf_counter()
    parts = plan_partitions(inputs, include, list(exclude), partition_bytes)
    plan = phases(steps, dedups)
    results: list[dict[str, dict[str, Any]]] = []
    previous = None
    for k, (filters, dedup) in enumerate(plan):
        tasks = [Task(p, k, filters, dedup, previous, builder, str(out), text_key, max_doc_bytes, data_format)
                 for p in parts]
        names = [n for n, _ in filters] + ([dedup[0]] if dedup else [])
        results += map_tasks(run_task, tasks, f"curate {', '.join(names) or 'read'} ({k + 1}/{len(plan)})")
        if dedup is not None:
            t1 = time.perf_counter()
            dedup_between(out, k, len(parts), builder(*dedup))
            results.append({dedup[0]: Counts(seconds=time.perf_counter() - t1).__dict__})
            previous = dedup[0]
    counts = merge_counts(results)
    read = counts[INPUT].docs_in
    kept = counts[next(reversed(counts))].kept if counts else 0
    removed = sum(sum(c.removed.values()) for c in counts.values())
    report = {"inputs": inputs, "partitions": len(parts), "documents": read, "kept": kept, "removed": removed,
              "seconds": round(time.perf_counter() - t0, 2),
              "steps": [{"step": name, **c.__dict__} for name, c in counts.items()]}
    write_text(out / "curate.json", json.dumps(report, indent=2) + "\n")
    return report
