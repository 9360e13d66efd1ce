"""Does curation pay? The same small decoder pretrained on the standard library's sources as they are and as
`lmforge curate` leaves them, at the same token budget, scored on the same held-out modules.

One pipeline (`lmforge pipeline`, in a child process): a byte-level BPE tokenizer trained on the raw sources (shared
by both arms), `curate` with the code recipe's steps (exact and MinHash near dedup, decontamination against
stdlib-mc / stdlib-doctest, e-mail and IP redaction), `prepare` of each arm with that tokenizer, then per arm and
seed a `pretrain` of the quickstart's llama-7m for --steps x 16 x 256 tokens (identical budget, schedule and seed
per pair) and `evaluate --tasks stdlib-ppl` (bits per byte of the held-out modules, which both arms' inputs
exclude). Reported: held-out bits per byte per arm and seed, their means and the paired difference with its
standard error over seeds.

    python benchmarks/curate_pretrain.py [--steps 300] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import yaml

from common import Record, add_out_argument

EXCLUDE = ["*/site-packages/*", "*/test/*", "*/tests/*", "*/idle_test/*", "*/__pycache__/*"]
STEPS = ["exact_dedup", "near_dedup", "decontaminate", "pii"]


def recipe(run_dir: Path, steps: int, seeds: list[int]) -> dict:
    from lmforge.data.stdlib import stdlib_heldout_texts

    root = sysconfig.get_paths()["stdlib"]
    exclude = EXCLUDE + [f"{root}/{name}" for name, _ in stdlib_heldout_texts()]
    source = {"inputs": ["{stdlib}"], "include": ["*.py"], "exclude": exclude}
    stages: dict = {
        "tokenizer": {"config": {**source, "kind": "bpe", "vocab_size": 4096, "max_documents": 800}},
        "curate": {"config": {**source, "steps": STEPS, "decontaminate": {"tasks": ["stdlib-mc", "stdlib-doctest"]},
                              "pii": {"entities": ["email", "ip"]}}},
        "data-raw": {"verb": "prepare", "config": {**source, "tokenizer": "${tokenizer.output}",
                                                   "validation_fraction": 0.01}},
        "data-curated": {"verb": "prepare", "config": {"inputs": ["${curate.output}"],
                                                       "tokenizer": "${tokenizer.output}", "validation_fraction": 0.01}}}
    for arm in ("raw", "curated"):
        for seed in seeds:
            name = f"{arm}-{seed}"
            stages[f"pretrain-{name}"] = {"verb": "pretrain", "config": {
                "objective": "causal_lm", "model": {"preset": "llama-7m"},
                "data": {"train": [f"${{data-{arm}.output}}"], "seq_len": 256},
                "train": {"steps": steps, "micro_batch": 16, "precision": "bf16", "seed": seed, "log_every": 25,
                          "eval_every": steps, "eval_batches": 4, "save_every": steps,
                          "optimizer": {"name": "adamw", "lr": 3.0e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]},
                          "schedule": {"name": "cosine", "warmup_steps": 30, "min_lr_ratio": 0.1}}}}
            stages[f"eval-{name}"] = {"verb": "evaluate", "config": {"model": f"${{pretrain-{name}.output}}",
                                                                      "tasks": ["stdlib-ppl"]}}
    return {"run_dir": str(run_dir), "stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--keep", help="run in this folder (kept; a re-run resumes) instead of a temporary one")
    add_out_argument(ap)
    args = ap.parse_args()
    rec = Record("curate_pretrain", args)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.keep or tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(recipe(run_dir, args.steps, args.seeds), sort_keys=False))
        cmd = [sys.executable, "-c", "import sys; from lmforge import cli; sys.exit(cli.main(sys.argv[1:]))",
               "pipeline", "--config", str(run_dir / "pipeline.yaml")]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit("the pipeline failed")
        bpb = {arm: {s: json.loads((run_dir / f"eval-{arm}-{s}" / "eval.json").read_text())["tasks"]["stdlib-ppl"]
                     for s in args.seeds} for arm in ("raw", "curated")}
        curate = json.loads((run_dir / "curate" / "curate.json").read_text())
        shards = {arm: {k: v["tokens"] for k, v in json.loads((run_dir / f"data-{arm}" / "index.json")
                                                               .read_text())["splits"].items()}
                  for arm in ("raw", "curated")}
    diffs = [bpb["curated"][s]["bits_per_byte"] - bpb["raw"][s]["bits_per_byte"] for s in args.seeds]
    result = {
        "train_tokens_per_arm": args.steps * 16 * 256, "seeds": args.seeds,
        "heldout": {k: bpb["raw"][args.seeds[0]][k] for k in ("documents", "bytes", "xz_bits_per_byte")},
        "curate": {"documents": curate["documents"], "kept": curate["kept"],
                   "removed_by_step": {s["step"]: sum(s["removed"].values()) for s in curate["steps"]}},
        "tokens_by_split": shards,
        "bits_per_byte": {arm: {str(s): round(bpb[arm][s]["bits_per_byte"], 4) for s in args.seeds}
                          for arm in ("raw", "curated")},
        "mean": {arm: round(statistics.mean(bpb[arm][s]["bits_per_byte"] for s in args.seeds), 4)
                 for arm in ("raw", "curated")},
        "curated_minus_raw": round(statistics.mean(diffs), 4),
        "stderr": round(statistics.stdev(diffs) / len(diffs) ** 0.5, 4) if len(diffs) > 1 else None}
    rec.write(result)


if __name__ == "__main__":
    main()
