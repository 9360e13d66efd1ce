"""`lmforge tune` on a tiny stdlib pretrain: 20 trials (TPE, median pruning) over the learning rate and weight decay
of recipes/tune/stdlib-lr.yaml; then the best values against the defaults (the recipe's lr 3e-3 and the engine's
3e-4, same steps and seed), each a normal `lmforge pretrain` run; and two worker processes on one journal.

Three parts, each under ~10 minutes on 2 cores; the study part resumes where it stopped (it stops itself with
Ctrl-C at --max-seconds, and the study continues on the next invocation):

    python benchmarks/plan_tune.py --part study      # again until it says the study is complete (--fresh: anew)
    python benchmarks/plan_tune.py --part compare
    python benchmarks/plan_tune.py --part workers

Results merge into benchmarks/results/plan_tune.json (one key per part).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common import RESULTS, ROOT, SCRATCH, Record, add_out_argument

RECIPE = ROOT / "recipes" / "tune" / "stdlib-lr.yaml"
DATA = ROOT / "runs" / "data" / "stdlib-bpe-8k"


def lmforge(*args: str, threads: int | None = None, timeout: float | None = None) -> tuple[int, float, str]:
    """(exit status, seconds, stdout) of `lmforge ARGS` in the repository root; Ctrl-C (SIGINT) at `timeout`."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate()
    return proc.returncode, time.perf_counter() - t0, out


def ensure_data() -> None:
    """The shards recipes/pretrain/tiny.yaml reads, built with the shipped recipes when missing."""
    if (DATA / "index.json").exists():
        return
    for verb, recipe in (("tokenizer", "tokenizer/stdlib-bpe-8k.yaml"), ("prepare", "prepare/stdlib.yaml")):
        code, _, _ = lmforge(verb, "--config", str(ROOT / "recipes" / recipe))
        if code:
            raise SystemExit(f"lmforge {verb} failed ({code})")


def part_study(run: Path, args, previous: dict) -> dict:
    """The recipe's study in `run`: continued when the last invocation stopped at --max-seconds, kept when it is
    complete (unless --fresh), else afresh."""
    import shutil

    if previous.get("status") == "complete" and not args.fresh and (run / "tune.json").exists():
        print("the study is complete (--fresh runs it again)", file=sys.stderr)
        return previous
    if args.fresh or previous.get("status") != "stopped":
        shutil.rmtree(run, ignore_errors=True)
    code, secs, out = lmforge("tune", "--config", str(RECIPE), f"run_dir={run}", timeout=args.max_seconds)
    print(out)
    record = json.loads((run / "tune.json").read_text())
    done = [t for t in record["trials"] if t["state"] in ("complete", "pruned", "fail")]
    spent = (previous.get("wall_s_total", 0.0) if previous.get("status") == "stopped" else 0.0) + secs
    return {"status": "complete" if code == 0 and len(done) == record["trials_wanted"] else "stopped",
            "exit_code": code, "invocations": previous.get("invocations", 0) + 1 if previous.get("status") ==
            "stopped" else 1, "wall_s_total": round(spent, 1), "trials_wanted": record["trials_wanted"],
            "counts": record["counts"], "best": record["best"], "surplus": record["surplus"],
            "retried": [t["number"] for t in record["retried"]],
            "trials": [{k: t[k] for k in ("number", "state", "value", "params", "last_step", "seconds")}
                       for t in record["trials"]],
            "trial_seconds": round(sum(t["seconds"] or 0 for t in record["trials"]), 1)}


def part_compare(run: Path, study: dict) -> dict:
    """The default learning rates and the best trial's values, each a fresh `lmforge pretrain` run of the same
    config the trials ran (base + the tune's overrides, same steps and seed)."""
    from lmforge.config import load_config, save_config
    from lmforge.stages import pretrain

    tune = yaml.safe_load(RECIPE.read_text())
    rows = {}
    arms = {"recipe default (lr 3e-3)": {}, "engine default (lr 3e-4)": {"train.optimizer.lr": 3e-4}}
    best = (study.get("best") or {}).get("params")
    if best:
        arms["tuned (best trial)"] = best
    for name, values in arms.items():
        folder = run / "compare" / name.split(" (")[0].replace(" ", "-")
        cfg = load_config(pretrain.Config, ROOT / tune["base"], {**tune["overrides"], **values,
                                                                 "run_dir": str(folder)})
        save_config(cfg, folder.with_suffix(".yaml"))
        if (folder / "eval.json").exists():
            import shutil

            shutil.rmtree(folder)
        code, secs, out = lmforge("pretrain", "--config", str(folder.with_suffix(".yaml")))
        result = json.loads((folder / "eval.json").read_text()) if code == 0 else {}
        rows[name] = {"lr": cfg.train.optimizer.lr, "weight_decay": cfg.train.optimizer.weight_decay,
                      "steps": cfg.train.steps, "seed": cfg.train.seed, "val_loss": result.get("val_loss"),
                      "val_bpb": result.get("val_bpb"), "seconds": round(secs, 1), "exit_code": code}
    return {"arms": rows, "best_trial_value": (study.get("best") or {}).get("value")}


def part_workers(run: Path, args) -> dict:
    """Two `lmforge tune` processes (one thread each) on one journal: trials counted, numbers, run folders."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    tune = yaml.safe_load(RECIPE.read_text())
    tune.update(run_dir=str(run), trials=args.worker_trials, study="workers")
    tune["overrides"].update({"train.steps": 60, "train.eval_every": 20})
    tune["warmup_steps"] = 20
    config = run.with_suffix(".yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(tune, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "lmforge.cli", "tune", "--config", str(config)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    secs = time.perf_counter() - t0
    trials = optuna.load_study(study_name="workers", storage=JournalStorage(JournalFileBackend(
        str(run / "study.journal")))).get_trials()
    record = json.loads((run / "tune.json").read_text())
    members = [t["number"] for t in record["trials"]]
    by_pid = {p.pid: sum(1 for t in trials if t.number in members and t.user_attrs.get("lmforge_pid") == p.pid)
              for p in procs}
    folders = sorted(p.name for p in run.glob("trial-*"))
    return {"trials_wanted": args.worker_trials, "trials_counted": len(members),
            "unique_numbers": len(set(members)), "journal_trials": len(trials),
            "surplus": record["surplus"], "left_running_or_waiting": sum(t.state.name in ("RUNNING", "WAITING")
                                                                        for t in trials),
            "run_folders": len(folders), "folders_match_trials": folders == [f"trial-{n:04d}" for n in
                                                                             sorted(members)],
            "per_worker": list(by_pid.values()), "exit_codes": [p.returncode for p in procs],
            "counts": record["counts"], "wall_s": round(secs, 1),
            "stderr_tail": [o[1][-300:] for o in outs if o[1].strip()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["study", "compare", "workers"], required=True)
    ap.add_argument("--max-seconds", type=float, default=540.0, help="study: stop (Ctrl-C) after this long")
    ap.add_argument("--fresh", action="store_true", help="study: start the study again even when it is complete")
    ap.add_argument("--worker-trials", type=int, default=8)
    ap.add_argument("--root", default=str(SCRATCH / "plan_tune"), help="folder of the runs")
    add_out_argument(ap)
    args = ap.parse_args()
    rec = Record("plan_tune", args, peers=["optuna"], sizes={"recipe": str(RECIPE.relative_to(ROOT))})
    path = Path(args.out) if args.out else RESULTS / "plan_tune.json"
    result = json.loads(path.read_text())["result"] if path.exists() else {}
    ensure_data()
    root = Path(args.root)
    if args.part == "study":
        result["study"] = part_study(root / "study", args, result.get("study", {}))
        if result["study"]["status"] != "complete":
            print("study stopped at --max-seconds; run the same command again to continue", file=sys.stderr)
    elif args.part == "compare":
        if result.get("study", {}).get("status") != "complete":
            raise SystemExit("run --part study to completion first")
        result["compare"] = part_compare(root, result["study"])
    else:
        import shutil

        shutil.rmtree(root / "workers", ignore_errors=True)
        result["workers"] = part_workers(root / "workers", args)
    rec.write(result)


if __name__ == "__main__":
    main()
