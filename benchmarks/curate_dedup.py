"""Near dedup (MinHash LSH): lmforge's `near_dedup` step vs datatrove's MinHash stages, same corpus and parameters.

Data: --docs distinct real documents (the functions and classes of the Python standard library with at least
--min-words words, no two with an exact 5-gram Jaccard >= 0.2 in the words of either side, so that every right
answer is known), plus seeded duplicates of random ones: --near-frac x docs near-duplicates with word edits (a
uniform 1-3% of the words substituted, deleted or followed by an inserted word) and --copy-frac x docs exact copies
(half re-cased and re-spaced), shuffled (seed 0) and written once to a JSONL file both sides read.
Parameters on both sides: lmforge's defaults (5-word shingles, 18 bands x 6 rows: P(candidate) = 0.985 at Jaccard
0.77, i.e. 3% word edits), seed 1; --bands 14 --rows 8 runs datatrove's own defaults on both sides.

Ours: `NearDedup.keys` per partition of --partition documents (as `lmforge curate` calls it in a worker) and
`NearDedup.duplicates` over all keys. Peer: datatrove (the FineWeb pipeline, the same algorithm and defaults:
64-bit shingle hashes, (a·x + b) mod 2^61 − 1 permutations, sorted bucket files, union-find clusters):
`MinhashDedupSignature` (rank 0 of 1), `MinhashDedupBuckets` (one task per band, one after another),
`MinhashDedupCluster`, their `run` methods called in the process as a LocalPipelineExecutor with one worker would,
their files on /dev/shm. It runs twice: with its default English word tokenizer (spaCy) and with a str.split one
(the same words after its simplify_text, which drops punctuation; its fastest setting, so the ratio is against it).
Why not datasketch's MinHashLSH: an index to query pair by pair, no clustering nor keep-first rule, 32-bit hashes.

Timed span: documents in memory -> the documents to remove (signatures + buckets + clusters). Each side in its own
process, one thread (no pool; OMP/MKL/OPENBLAS_NUM_THREADS=1), interleaved, best of --repeats, at seed 1.
Recall: seeded duplicates that end in their original's cluster. Precision: removed documents whose cluster's kept
document is from their own group (the original and its seeded copies). Which pairs one seed's permutations catch is
luck (the S-curve is a probability), so recall and precision are also given over seeds 1..--recall-seeds (untimed),
with the recall the S-curve predicts from each seeded document's exact Jaccard in each side's words.

    python benchmarks/curate_dedup.py [--docs 10000] [--repeats 3] [--recall-seeds 10]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from common import Record, add_out_argument, run_child

SHINGLE, SEED = 5, 1
BANDS, ROWS = 18, 6  # lmforge's NearDedupConfig defaults (a test checks they agree); --bands / --rows override
WORD = re.compile(r"[^\W_]+")  # a word as normalise() splits them


# ---- the corpus ---------------------------------------------------------------------------------------------------

def sources() -> list[tuple[str, str]]:
    """(file:line, source) of every function and class in the standard library (no site-packages), in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts:
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.append((f"{p.relative_to(root)}:{node.lineno}", "".join(lines[node.lineno - 1:node.end_lineno])))
    return out


def shingle_set(words: list[str]) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + SHINGLE]) for i in range(len(words) - SHINGLE + 1)} if len(words) >= SHINGLE else {
        tuple(words)}


def distinct(texts: list[tuple[str, str]], n: int, min_words: int, limit: float = 0.2) -> list[tuple[str, str]]:
    """The first `n` texts of at least `min_words` words whose exact Jaccard to every one kept before is < `limit`
    with the words of either side: our `normalise` and datatrove's `simplify_text` (which also maps numbers to 0)."""
    from lmforge.curate.exact import normalise

    try:
        from datatrove.utils.text import simplify_text
    except ImportError:
        simplify_text = None
    views = [normalise] + ([simplify_text] if simplify_text else [])
    indexes: list[dict[tuple[str, ...], list[int]]] = [{} for _ in views]
    kept, sets = [], []
    for key, text in texts:
        if len(normalise(text).split()) < min_words:
            continue
        mine = [shingle_set(view(text).split()) for view in views]
        if any(c / (len(s) + len(sets[j][v]) - c) >= limit for v, s in enumerate(mine)
               for j, c in Counter(j for sh in s for j in indexes[v].get(sh, ())).items()):
            continue
        for v, s in enumerate(mine):
            for sh in s:
                indexes[v].setdefault(sh, []).append(len(kept))
        kept.append((key, text))
        sets.append(mine)
        if len(kept) == n:
            break
    return kept


def edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    """`rate` of the words (at least one) substituted, deleted, or followed by an inserted word."""
    spans = [m.span() for m in WORD.finditer(text)]
    for i in sorted(rng.sample(range(len(spans)), max(1, round(rate * len(spans)))), reverse=True):
        a, b = spans[i]
        op, new = rng.randrange(3), rng.choice(vocab)
        text = text[:a] + (new if op == 0 else "" if op == 1 else text[a:b] + " " + new) + text[b:]
    return text


def make_corpus(args) -> list[dict]:
    """[{"key", "text", "group"}] in corpus order; group = the key of the base document it copies (or its own)."""
    t = time.perf_counter()
    base = distinct(sources(), args.docs, args.min_words)
    if len(base) < args.docs:
        raise SystemExit(f"only {len(base)} distinct documents of >= {args.min_words} words in the standard library")
    rng = random.Random(0)
    vocab = sorted({w for _, text in base[:2000] for w in WORD.findall(text)})
    docs = [{"key": k, "text": text, "group": k} for k, text in base]
    for i in range(round(args.near_frac * len(base))):
        k, text = base[rng.randrange(len(base))]
        docs.append({"key": f"near{i}", "text": edit(text, rng.uniform(0.01, 0.03), rng, vocab), "group": k})
    for i in range(round(args.copy_frac * len(base))):
        k, text = base[rng.randrange(len(base))]
        docs.append({"key": f"copy{i}", "text": text if i % 2 else "  " + text.upper().replace("\n", "\n\n"),
                     "group": k})
    rng.shuffle(docs)
    print(f"corpus: {len(docs)} documents ({len(base)} distinct) in {time.perf_counter() - t:.0f} s",
          file=sys.stderr, flush=True)
    return docs


# ---- the sides (each in its own process) ----------------------------------------------------------------------------

def run_ours(texts: list[str], partition: int, seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(seconds, cluster label per document, removed flag per document)."""
    from lmforge.curate.base import Doc
    from lmforge.curate.minhash import NearDedup, NearDedupConfig

    docs = [Doc(str(i), t, str(i)) for i, t in enumerate(texts)]
    start = time.perf_counter()
    step = NearDedup(NearDedupConfig(shingle=SHINGLE, bands=BANDS, rows=ROWS, seed=seed))
    keys = np.concatenate([step.keys(docs[i:i + partition]) for i in range(0, len(docs), partition)])
    removed = step.duplicates([d.key for d in docs], keys)
    seconds = time.perf_counter() - start
    flags = np.zeros(len(docs), dtype=bool)
    flags[[int(k) for k in removed]] = True
    return seconds, step.clusters(keys), flags  # clusters again, untimed: the labels the removals came from


def run_datatrove(texts: list[str], tokenizer: str, shm: str | None,
                  seed: int) -> tuple[float, np.ndarray, np.ndarray]:
    """(seconds, cluster label per document, removed flag per document) of datatrove's MinHash stages 1-3."""
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupSignature)
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.logging import logger
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitTokenizer(WordTokenizer):
        """Whitespace words (the text is already simplified: no punctuation)."""

        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    logger.remove()
    cfg = MinhashConfig(n_grams=SHINGLE, num_buckets=BANDS, hashes_per_bucket=ROWS, seed=seed,
                        hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        sigs, buckets, clusters = (f"{tmp}/{d}" for d in ("sigs", "buckets", "clusters"))
        language = SplitTokenizer() if tokenizer == "split" else "en"
        start = time.perf_counter()
        MinhashDedupSignature(output_folder=sigs, config=cfg, language=language).run(iter(docs), 0, 1)
        for bucket in range(BANDS):
            MinhashDedupBuckets(input_folder=sigs, output_folder=buckets, config=cfg).run(None, bucket, BANDS)
        MinhashDedupCluster(input_folder=buckets, output_folder=clusters, config=cfg,
                            save_cluster_id=True).run(None, 0, 1)
        seconds = time.perf_counter() - start
        n = len(texts)
        removed = np.zeros(n, dtype=bool)
        path = Path(clusters) / "000000.remove"
        if path.exists():
            removed[np.fromfile(path, dtype="<u4")] = True
        label = np.arange(n, dtype=np.int64)
        path = Path(clusters) / "000000.clusters"
        if path.exists():
            pairs = np.fromfile(path, dtype="<u4").reshape(-1, 2)
            label[pairs[:, 0]] = n + pairs[:, 1].astype(np.int64)  # singletons keep their own index
    return seconds, label, removed


def child(args) -> None:
    texts = [json.loads(line)["text"] for line in Path(args.corpus).read_text(encoding="utf-8").splitlines()]
    if args.child == "ours":
        seconds, label, removed = run_ours(texts, args.partition, args.seed)
    else:
        seconds, label, removed = run_datatrove(texts, args.child.split(":")[1], args.shm, args.seed)
    np.savez(args.labels, label=label, removed=removed)
    print(json.dumps({"seconds": seconds}))


# ---- the driver ---------------------------------------------------------------------------------------------------

def expected_recall(docs: list[dict], view) -> float:
    """Mean P(candidate) = 1 − (1 − s^rows)^bands of the seeded documents, s the exact Jaccard to their original in
    the words of `view` (a side's normalisation): the recall the S-curve predicts (chains aside)."""
    text = {d["key"]: d["text"] for d in docs}
    sims = []
    for d in docs:
        if d["group"] != d["key"]:
            a, b = shingle_set(view(d["text"]).split()), shingle_set(view(text[d["group"]]).split())
            sims.append(len(a & b) / len(a | b))
    return round(float(np.mean(1 - (1 - np.array(sims) ** ROWS) ** BANDS)), 4)


def score(docs: list[dict], label: np.ndarray, removed: np.ndarray) -> dict:
    """Recall, precision and counts of one side's clusters against the seeded groups."""
    groups = [d["group"] for d in docs]
    where = {d["key"]: i for i, d in enumerate(docs)}
    seeded = [i for i, d in enumerate(docs) if d["group"] != d["key"]]
    found = [label[i] == label[where[docs[i]["group"]]] for i in seeded]
    kept_of: dict[int, list[int]] = {}
    for i in np.flatnonzero(~removed):
        kept_of.setdefault(int(label[i]), []).append(int(i))
    right = 0
    for i in np.flatnonzero(removed):
        kept = kept_of.get(int(label[i]), [])
        right += len(kept) == 1 and groups[kept[0]] == groups[i]
    n_removed = int(removed.sum())
    return {"recall": round(float(np.mean(found)), 4), "precision": round(right / max(n_removed, 1), 4),
            "removed": n_removed, "seeded": len(seeded), "seeded_found": int(np.sum(found)),
            "clusters_with_no_kept_document": sum(1 for i in np.flatnonzero(removed)
                                                  if int(label[i]) not in kept_of)}


def main() -> None:
    global BANDS, ROWS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=10000, help="distinct real documents before the seeded copies")
    ap.add_argument("--min-words", type=int, default=30, help="shortest document (normalised words)")
    ap.add_argument("--near-frac", type=float, default=0.2, help="near-duplicates (1-3%% word edits) per document")
    ap.add_argument("--copy-frac", type=float, default=0.05, help="exact copies per document")
    ap.add_argument("--partition", type=int, default=5000, help="documents per call of our keys()")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side, interleaved; the best counts")
    ap.add_argument("--recall-seeds", type=int, default=10,
                    help="recall and precision also over permutation seeds 1..N (untimed; ours and datatrove:split)")
    ap.add_argument("--sides", default="ours,datatrove:split,datatrove:spacy", help="which sides to run")
    ap.add_argument("--shm", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="folder for datatrove's signature / bucket files")
    add_out_argument(ap)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--labels", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=SEED, help=argparse.SUPPRESS)
    ap.add_argument("--bands", type=int, default=BANDS, help="LSH bands on both sides")
    ap.add_argument("--rows", type=int, default=ROWS, help="rows per band on both sides")
    args = ap.parse_args()
    BANDS, ROWS = args.bands, args.rows
    if args.child:
        child(args)
        return

    rec = Record("curate_dedup", args, peers=["datatrove", "spacy", "xxhash", "numpy"],
                 sizes={"docs": args.docs, "near_frac": args.near_frac, "copy_frac": args.copy_frac,
                        "repeats": args.repeats, "recall_seeds": args.recall_seeds})
    docs = make_corpus(args)
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    sides = args.sides.split(",")
    runs: dict[str, list[float]] = {s: [] for s in sides}
    scores: dict[str, dict[int, dict]] = {s: {} for s in sides}  # side -> seed -> score
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in docs), encoding="utf-8")

        def one(side: str, seed: int) -> float:
            labels = Path(tmp) / f"{side.replace(':', '-')}.npz"
            cmd = [sys.executable, __file__, "--child", side, "--corpus", str(corpus), "--labels", str(labels),
                   "--partition", str(args.partition), "--seed", str(seed), "--bands", str(BANDS),
                   "--rows", str(ROWS)] + (["--shm", args.shm] if args.shm else [])
            r = run_child(cmd, env=env)
            if "error" in r:
                raise SystemExit(f"{side} failed: {r['error']}")
            out = np.load(labels)
            scores[side][seed] = score(docs, out["label"], out["removed"])  # the same every run of a seed
            print(f"{side} seed {seed}: {r['seconds']:.2f} s, {scores[side][seed]}", file=sys.stderr, flush=True)
            return r["seconds"]

        for _ in range(args.repeats):
            for side in sides:
                runs[side].append(one(side, SEED))
        for seed in range(SEED + 1, SEED + args.recall_seeds):
            for side in sides:
                if side != "datatrove:spacy":  # the same words as datatrove:split, 7x slower
                    one(side, seed)

    result: dict = {"documents": len(docs), "distinct": args.docs, "mb": round(n_bytes / 1e6, 2),
                    "near_duplicates": round(args.near_frac * args.docs),
                    "exact_copies": round(args.copy_frac * args.docs), "edit_rate": [0.01, 0.03],
                    "shingle": SHINGLE, "bands": BANDS, "rows": ROWS, "seed": SEED, "threads": 1,
                    "partition": args.partition, "sides": {}}
    for side in sides:
        best = min(runs[side])
        recalls = [sc["recall"] for sc in scores[side].values()]
        precisions = [sc["precision"] for sc in scores[side].values()]
        result["sides"][side] = {
            "seconds": round(best, 3), "runs_s": [round(x, 3) for x in runs[side]],
            "docs_per_s": round(len(docs) / best, 1), **scores[side][SEED],
            "seeds": sorted(scores[side]), "recall_mean": round(float(np.mean(recalls)), 4),
            "recall_sd": round(float(np.std(recalls)), 4), "precision_mean": round(float(np.mean(precisions)), 4),
            "precision_min": round(float(np.min(precisions)), 4)}
    from lmforge.curate.exact import normalise

    for side in sides:
        if side == "ours":
            result["sides"][side]["recall_expected"] = expected_recall(docs, normalise)
        else:
            from datatrove.utils.text import simplify_text

            result["sides"][side]["recall_expected"] = expected_recall(docs, simplify_text)
    peers = [s for s in sides if s.startswith("datatrove")]
    print(f"{len(docs)} documents ({args.docs} distinct, {result['near_duplicates']} near-duplicates with 1-3% word "
          f"edits, {result['exact_copies']} exact copies), {n_bytes / 1e6:.1f} MB; shingle {SHINGLE}, "
          f"{BANDS} bands x {ROWS} rows; 1 process each, best of {args.repeats}; recall / precision at seed {SEED} "
          f"and the mean over seeds {SEED}..{SEED + args.recall_seeds - 1}")
    print(f"{'':34}{'docs/s':>8}{'seconds':>9}{'recall':>8}{'precision':>10}{'recall (seeds)':>17}"
          f"{'precision (min)':>17}{'S-curve recall':>16}")
    for side in sides:
        s = result["sides"][side]
        name = {"ours": "ours: near_dedup", "datatrove:split": "datatrove, str.split words",
                "datatrove:spacy": "datatrove, spaCy words (default)"}.get(side, side)
        print(f"{name:34}{s['docs_per_s']:>8.0f}{s['seconds']:>9.2f}{s['recall']:>8.4f}{s['precision']:>10.4f}"
              f"{s['recall_mean']:>10.4f} ±{s['recall_sd']:.4f}{s['precision_min']:>17.4f}"
              f"{s['recall_expected']:>16.4f}")
    if "ours" in sides and peers:
        fastest = min(peers, key=lambda p: result["sides"][p]["seconds"])
        o, p = result["sides"]["ours"], result["sides"][fastest]
        result["peer"] = fastest
        result["ratio"] = round(o["docs_per_s"] / p["docs_per_s"], 3)
        result["recall_diff"] = round(o["recall"] - p["recall"], 4)
        result["recall_mean_diff"] = round(o["recall_mean"] - p["recall_mean"], 4)
        print(f"ratio ours / {fastest} (docs/s): {result['ratio']:.2f}x; recall at seed {SEED} {o['recall']:.4f} vs "
              f"{p['recall']:.4f}, over seeds {o['recall_mean']:.4f} vs {p['recall_mean']:.4f}; precision "
              f"{o['precision']:.4f} vs {p['precision']:.4f}")
    rec.write(result)


if __name__ == "__main__":
    main()
