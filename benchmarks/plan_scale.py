"""Scaling-law fits (issue 19): (1) recovery of known (E, A, B, α, β) from synthetic losses with 2% noise over a
4×5 grid, over many seeds; (2) a real grid of tiny stdlib pretraining runs (`lmforge scale`,
recipes/scale/stdlib-tiny.yaml), the fitted law with bootstrap intervals, and its prediction of a held-out larger
run's final validation loss. Targets: |α − α*|, |β − β*| ≤ 0.03; held-out error within ±3%.

    flock /tmp/lmforge-bench.lock python benchmarks/plan_scale.py --part synthetic
    flock /tmp/lmforge-bench.lock python benchmarks/plan_scale.py --part grid --max-seconds 540   # again until done

The grid part runs `lmforge scale` in a child process for at most --max-seconds, then interrupts it (SIGINT: the
run in progress saves a checkpoint) and exits; run it again and it continues where it stopped. Its wall time is
added up over the invocations (SCRATCH/plan_scale/seconds.json). Data: the stdlib token shards of an existing
runs/ folder (runs/data/stdlib-bpe-8k, else runs/quickstart/data), else prepared once into SCRATCH.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import RESULTS, ROOT, SCRATCH, Record, add_out_argument

TRUTH = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
"""Hoffmann et al. 2022's fitted law (approach 3) as the known truth."""
N_GRID = np.geomspace(1e6, 1e10, 4)
D_GRID = np.geomspace(1e8, 1e12, 5)
RECIPE = ROOT / "recipes" / "scale" / "stdlib-tiny.yaml"


def synthetic(seeds: int, noise: float) -> dict:
    """α, β errors of fits to L*(1 + u), u uniform in ±noise (and, for reference, Gaussian with σ = noise)."""
    from lmforge.plan.fit import fit_law

    n, d = (g.ravel() for g in np.meshgrid(N_GRID, D_GRID, indexing="ij"))
    truth = TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]
    out = {"truth": TRUTH, "N": N_GRID.tolist(), "D": D_GRID.tolist(), "seeds": seeds, "noise": noise}
    for kind in ("uniform", "gaussian"):
        errs, t0 = [], time.perf_counter()
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            u = rng.uniform(-noise, noise, truth.shape) if kind == "uniform" else noise * rng.standard_normal(
                truth.shape)
            f = fit_law(n, d, truth * (1 + u), bootstrap=0)
            errs.append((f.alpha - TRUTH["alpha"], f.beta - TRUTH["beta"], f.E / TRUTH["E"] - 1))
        e = np.abs(np.array(errs))
        out[kind] = {"alpha_max": e[:, 0].max(), "alpha_mean": e[:, 0].mean(), "beta_max": e[:, 1].max(),
                     "beta_mean": e[:, 1].mean(), "E_rel_max": e[:, 2].max(),
                     "within_0.03": int(((e[:, 0] <= 0.03) & (e[:, 1] <= 0.03)).sum()),
                     "seconds_per_fit": (time.perf_counter() - t0) / seeds}
    return out


def shards() -> Path:
    """Existing stdlib shards under runs/, else prepared once into SCRATCH."""
    for p in (ROOT / "runs" / "data" / "stdlib-bpe-8k", ROOT / "runs" / "quickstart" / "data"):
        if (p / "index.json").exists():
            return p
    out = SCRATCH / "plan_scale" / "data"
    if not (out / "index.json").exists():
        tok = SCRATCH / "plan_scale" / "tokenizer"
        subprocess.run([_lmforge(), "tokenizer", "--config", str(ROOT / "recipes/tokenizer/stdlib-bpe-8k.yaml"),
                        f"output={tok}"], check=True, cwd=ROOT)
        subprocess.run([_lmforge(), "prepare", "--config", str(ROOT / "recipes/prepare/stdlib.yaml"),
                        f"tokenizer={tok}", f"output={out}"], check=True, cwd=ROOT)
    return out


def _lmforge() -> str:
    return shutil.which("lmforge") or str(Path(sys.executable).with_name("lmforge"))


def grid(run_dir: Path, max_seconds: float, recipe: Path = RECIPE) -> dict | None:
    """Run (or continue) the grid for at most `max_seconds`; the scale.json figures when it finished, else None."""
    data = shards()
    state = run_dir.parent / f"{run_dir.name}.seconds.json"
    spent = json.loads(state.read_text())["seconds"] if state.exists() else 0.0
    cmd = [_lmforge(), "scale", "--config", str(recipe), f"run_dir={run_dir}",
           f"overrides={{data.train: [{data}]}}"]
    if not (run_dir / "scale.json").exists():
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT)
        try:
            code = child.wait(timeout=max_seconds)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGINT)
            code = child.wait()
        spent += time.perf_counter() - t0
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"seconds": spent}))
        if code != 0:
            print(f"grid: stopped (exit {code}) after {spent:.0f} s in all; run again to continue", file=sys.stderr)
            return None
    out = json.loads((run_dir / "scale.json").read_text())
    out.pop("frontier", None)
    for entry in out["fits"].values():
        entry["fit"].pop("samples", None)
    out["fit"].pop("samples", None)
    points = [json.loads((Path(p["folder"]) / "metrics.jsonl").read_text().splitlines()[-1]) for p in out["points"]]
    return {"data": str(data), "recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
            "seconds_all": spent,
            "tokens_per_s": [p.get("tokens_per_s") for p in points], **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("synthetic", "grid", "all"), default="all")
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--max-seconds", type=float, default=540.0)
    ap.add_argument("--run-dir", default=str(SCRATCH / "plan_scale" / "stdlib-tiny"))
    ap.add_argument("--recipe", default=str(RECIPE), help="the scale recipe of the grid part")
    ap.add_argument("--key", default="grid", help="where the grid part's figures go in the result")
    add_out_argument(ap)
    args = ap.parse_args()
    rec = Record("plan_scale", args, peers=["scipy", "numpy"])
    path = Path(args.out) if args.out else RESULTS / "plan_scale.json"
    result = json.loads(path.read_text()).get("result", {}) if path.exists() else {}
    if args.part in ("synthetic", "all"):
        result["synthetic"] = synthetic(args.seeds, args.noise)
        s = result["synthetic"]
        for kind in ("uniform", "gaussian"):
            r = s[kind]
            print(f"synthetic ({kind} ±{args.noise:.0%}, {args.seeds} seeds): |Δα| max {r['alpha_max']:.4f} mean "
                  f"{r['alpha_mean']:.4f}; |Δβ| max {r['beta_max']:.4f} mean {r['beta_mean']:.4f}; "
                  f"{r['within_0.03']}/{args.seeds} within 0.03")
    if args.part in ("grid", "all"):
        g = grid(Path(args.run_dir), args.max_seconds, Path(args.recipe).resolve())
        if g is None:
            sys.exit(3)
        result[args.key] = g
        h = g.get("holdout", {})
        print(f"grid: {len(g['points'])} runs, {g['seconds_all']:.0f} s in all; held-out {h.get('name')}: predicted "
              f"{h.get('predicted', float('nan')):.4f}, measured {h.get('loss', float('nan')):.4f} "
              f"({h.get('error_pct', float('nan')):+.2f}%)")
    rec.write(result)


if __name__ == "__main__":
    main()
