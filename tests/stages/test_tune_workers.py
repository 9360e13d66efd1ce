"""`lmforge tune` over tiny stdlib pretrains (llama-tiny, seq_len 32, a few steps per trial): two worker processes
on one journal run exactly the study's trials between them, each a normal run directory; a worker killed
(SIGKILL) or stopped with Ctrl-C in the middle of a trial leaves a study that the same command finishes, the
trial continuing from its checkpoint; best.yaml runs as a pretrain config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from engine_fixtures import bpe_data, write_config  # noqa: F401

optuna = pytest.importorskip("optuna")

from lmforge import cli  # noqa: E402
from lmforge.engine.metrics import read_metrics  # noqa: E402
from lmforge.stages import _search as S  # noqa: E402

STEPS = 6

# A worker that plants a fault: when trial TRIAL's training loader is asked for the first micro batch of step STEP,
# it sends itself SIG (KILL or INT).
WORKER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sig, trial, step, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    import lmforge.stages.pretrain as pretrain
    from lmforge import cli
    from lmforge.data.loader import PackedLoader

    real_main, real_next, current = pretrain.main, PackedLoader.next_batch, {}

    def main(cfg):
        current.update(run=Path(cfg.run_dir).name, accum=cfg.train.grad_accum)
        return real_main(cfg)

    def next_batch(self):
        if current["run"] == trial and self.windows[0].split == "train" and \\
                self.pos == (step - 1) * current["accum"] * self.micro_batch * self.world:
            os.kill(os.getpid(), getattr(signal, "SIG" + sig))
        return real_next(self)

    pretrain.main, PackedLoader.next_batch = main, next_batch
    sys.exit(cli.main(["tune", "--config", config]))
""")


def study_config(tmp_path: Path, shards: Path, trials: int, **kw) -> Path:
    base = write_config(tmp_path / "base.yaml", tmp_path / "unused", shards)
    cfg = {"base": str(base), "verb": "pretrain", "run_dir": str(tmp_path / "study"), "trials": trials,
           "overrides": {"data.seq_len": 32, "train.steps": STEPS, "train.eval_every": 2, "train.save_every": 2,
                         "train.eval_batches": 2, "train.schedule.warmup_steps": 1},
           "space": {"train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
           "startup_trials": 2, "pruner_startup_trials": 2, **kw}
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def journal_trials(run: Path) -> list:
    storage = S.open_storage("", run)
    return optuna.load_study(study_name=run.name, storage=storage).get_trials()


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def check_study(run: Path, trials: int) -> dict:
    """The study holds exactly `trials` trials, each finished and run in its own folder with its sampled lr."""
    record = json.loads((run / "tune.json").read_text())
    members = [t["number"] for t in record["trials"]]
    assert len(members) == trials == len(set(members))
    assert all(t["state"] in ("complete", "pruned") for t in record["trials"])
    assert sorted(p.name for p in run.glob("trial-*")) == [f"trial-{n:04d}" for n in sorted(members)]
    for t in record["trials"]:
        cfg = yaml.safe_load((Path(t["run_dir"]) / "config.yaml").read_text())
        assert cfg["run_dir"] == t["run_dir"] and cfg["train"]["optimizer"]["lr"] == t["params"]["train.optimizer.lr"]
        steps = [r["step"] for r in read_metrics(Path(t["run_dir"])) if "loss" in r]
        assert steps == list(range(1, len(steps) + 1))  # every step once, resumed or not
        assert (steps[-1] == STEPS) == (t["state"] == "complete")
    return record


def test_two_workers_share_one_journal_without_lost_or_duplicated_trials(bpe_data, tmp_path):  # noqa: F811
    config = study_config(tmp_path, bpe_data.shards, trials=6)
    cmd = [sys.executable, "-m", "lmforge.cli", "tune", "--config", str(config)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    run = tmp_path / "study"
    record = check_study(run, 6)
    trials = journal_trials(run)
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in trials)  # none left running or waiting
    extra = [t for t in trials if t.number not in {m["number"] for m in record["trials"]}]
    assert all(t.user_attrs.get(S.REASON) == "surplus" and S.RUN not in t.user_attrs for t in extra)
    workers = {t.user_attrs[S.PID] for t in trials if t.number in {m["number"] for m in record["trials"]}}
    assert workers == {p.pid for p in procs}  # both did trials
    assert "Traceback" not in outs[0][1] + outs[1][1]


@pytest.mark.parametrize("sig", ["KILL", "INT"])
def test_a_worker_stopped_mid_trial_leaves_a_study_the_same_command_finishes(bpe_data, tmp_path, sig, capsys):  # noqa: F811
    config = study_config(tmp_path, bpe_data.shards, trials=2, pruner="none")
    run = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-c", WORKER, sig, "trial-0001", "5", str(config)], capture_output=True,
                          text=True, env=env(), timeout=300)
    assert proc.returncode == (-signal.SIGKILL if sig == "KILL" else 130), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    stopped = next(t for t in journal_trials(run) if t.number == 1)
    assert stopped.state.name == ("RUNNING" if sig == "KILL" else "FAIL")
    saved = 4 if sig == "KILL" else 5  # the last checkpoint: save_every 2, or the one Ctrl-C writes
    assert (run / "trial-0001" / "checkpoints" / f"step-{saved:06d}").is_dir()

    assert cli.main(["tune", "--config", str(config)]) == 0  # the same command again
    record = check_study(run, 2)
    retry = next(t for t in record["trials"] if t["retry_of"] == 1)
    assert [t["number"] for t in record["trials"]] == [0, 2] and retry["number"] == 2
    assert retry["params"] == stopped.params  # the same values, in the same run, resumed
    assert not (run / "trial-0001").exists()
    resumed = [r for r in read_metrics(Path(retry["run_dir"])) if "loss" in r]
    assert len(resumed) == STEPS
    assert [t["number"] for t in record["retried"]] == [1]
    best = yaml.safe_load((run / "best.yaml").read_text())
    assert best["train"]["optimizer"]["lr"] == record["best"]["params"]["train.optimizer.lr"]
    assert cli.main(["pretrain", "--config", str(run / "best.yaml")]) == 0  # ready to run
    assert json.loads((run / "best" / "eval.json").read_text())["val_loss"] == pytest.approx(
        record["best"]["value"], rel=1e-3)
