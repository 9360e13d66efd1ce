"""Exact resume and atomic checkpoints of `lmforge pretrain`, on real data, across real process deaths.

Run A trains 12 steps straight. Other runs use the same config, die in a subprocess (SIGKILL between steps,
SIGKILL in the middle of a checkpoint write, SIGTERM) or after their last checkpoint, and are resumed with the
same command; their final weights, per-step losses and eval.json must be the same as A's.

Every run here uses one CPU thread: with two, some CPU kernel's result differs in the last bits from one run to
the next (two straight runs can differ at all), which no resume can match; one thread isolates what these tests
are about, the checkpoint and the resume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine_fixtures import write_config

from lmforge import cli
from lmforge.engine.checkpoint import list_checkpoints, load_checkpoint

STEPS, ACCUM = 12, 2

# Runs `lmforge pretrain --config CONFIG` in a fresh interpreter, after planting a fault:
#   kill-at STEP / term-at STEP: SIGKILL / SIGTERM itself when the training loader is asked for the first micro
#       batch of STEP (eval loaders read the validation split and are left alone);
#   kill-in-save STEP: SIGKILL itself while checkpoint STEP is written, after model.safetensors and half of
#       optimizer.safetensors are in the temporary directory.
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path

    mode, step, config, accum = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

    import lmforge.engine.checkpoint as ckpt
    from lmforge import cli
    from lmforge.data.loader import PackedLoader

    if mode in ("kill-at", "term-at"):
        sig = signal.SIGKILL if mode == "kill-at" else signal.SIGTERM
        real_next = PackedLoader.next_batch

        def next_batch(self):
            if self.windows[0].split == "train" and \\
                    self.pos == (step - 1) * accum * self.micro_batch * self.world:
                os.kill(os.getpid(), sig)
            return real_next(self)

        PackedLoader.next_batch = next_batch
    elif mode == "kill-in-save":
        real_save = ckpt.save_file

        def save_file(tensors, filename, *args, **kwargs):
            path = Path(filename)
            if path.name == "optimizer.safetensors" and path.parent.name.startswith(f".tmp-step-{step:06d}-"):
                real_save(tensors, filename, *args, **kwargs)
                size = path.stat().st_size
                with open(path, "r+b") as f:
                    f.truncate(size // 2)  # a torn write
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(tensors, filename, *args, **kwargs)

        ckpt.save_file = save_file
    else:
        raise SystemExit(f"unknown mode {mode}")
    sys.exit(cli.main(["pretrain", "--config", config]))
""")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread for the runs in this process (see the module docstring); the subprocesses get OMP=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _faulty_run(tmp_path: Path, config: Path, mode: str, step: int) -> subprocess.CompletedProcess:
    script = tmp_path / "faulty_pretrain.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), mode, str(step), str(config), str(ACCUM)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


def _pretrain(config: Path) -> int:
    return cli.main(["pretrain", "--config", str(config)])


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every logged training row."""
    return [(r["step"], r["loss"]) for r in _rows(run) if "loss" in r]


def _final(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ from the straight run in {differ}"


@pytest.fixture(scope="module")
def straight(bpe_data, tmp_path_factory) -> Path:
    """Run A: 12 steps without interruption."""
    root = tmp_path_factory.mktemp("straight")
    config = write_config(root / "config.yaml", root / "run", bpe_data.shards)
    assert _pretrain(config) == 0
    run = root / "run"
    assert [s for s, _ in _losses(run)] == list(range(1, STEPS + 1))
    return run


def test_exact_resume_after_sigkill(straight, bpe_data, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", run, bpe_data.shards)

    proc = _faulty_run(tmp_path, config, "kill-at", 9)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000006"]
    assert not (run / "final").exists()
    assert [s for s, _ in _losses(run)] == list(range(1, 9))  # steps 7 and 8 were logged, then lost

    assert _pretrain(config) == 0
    _assert_same_weights(_final(straight), _final(run))
    b = _losses(run)
    assert [s for s, _ in b] == list(range(1, STEPS + 1)), "each step must be logged exactly once"
    assert b == _losses(straight)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [6, 12]


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(straight, bpe_data, tmp_path):
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    config = write_config(tmp_path / "config.yaml", run, bpe_data.shards)

    proc = _faulty_run(tmp_path, config, "kill-in-save", STEPS)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = sorted(ckdir.glob(".tmp-step-*"))
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".tmp-step-{STEPS:06d}-")
    assert sorted(p.name for p in leftovers[0].iterdir()) == ["model.safetensors", "optimizer.safetensors"]
    assert not (ckdir / f"step-{STEPS:06d}").exists()

    found = list_checkpoints(ckdir)
    assert found == [(6, ckdir / "step-000006")]
    msd, osd, state = load_checkpoint(found[0][1])
    assert state["step"] == 6 and state["data"]["pos"] == 6 * ACCUM * 4
    a_msd, a_osd, _ = load_checkpoint(straight / "checkpoints" / "step-000006")
    _assert_same_weights(a_msd, msd)  # the surviving checkpoint is whole: the same as the straight run's
    assert osd["state"].keys() == a_osd["state"].keys() and osd["state"]
    assert all(torch.equal(v, a_osd["state"][p][k]) for p, st in osd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor))

    assert _pretrain(config) == 0
    assert not list(ckdir.glob(".tmp-step-*")), "the resumed run must clean leftovers of the killed write"
    assert [s for s, _ in list_checkpoints(ckdir)] == [6, STEPS]
    _assert_same_weights(_final(straight), _final(run))
    assert _losses(run) == _losses(straight)


def test_sigterm_checkpoints_and_resumes(straight, bpe_data, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", run, bpe_data.shards)

    proc = _faulty_run(tmp_path, config, "term-at", 9)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-3000:])
    assert "step 9" in proc.stdout, proc.stdout
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [6, 9]
    assert not list((run / "checkpoints").glob(".tmp-step-*"))
    assert not (run / "final").exists()
    assert [s for s, _ in _losses(run)] == list(range(1, 10))

    assert _pretrain(config) == 0
    _assert_same_weights(_final(straight), _final(run))
    assert _losses(run) == _losses(straight)


def test_a_rerun_at_the_last_step_writes_the_same_eval_json(straight, bpe_data, tmp_path):
    """A finished run re-run, and a run killed after its last checkpoint (before final/ and eval.json were
    written), train nothing and write eval.json with the last validation metrics, as the straight run did."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    config = write_config(tmp_path / "config.yaml", run, bpe_data.shards)
    want = json.loads((straight / "eval.json").read_text())
    assert want["step"] == STEPS and "val_loss" in want

    assert _pretrain(config) == 0  # the finished run, re-run
    assert json.loads((run / "eval.json").read_text()) == want

    shutil.rmtree(run / "final")  # killed after checkpoint 12, before the model and eval.json were written
    (run / "eval.json").unlink()
    assert _pretrain(config) == 0
    assert json.loads((run / "eval.json").read_text()) == want
    _assert_same_weights(_final(straight), _final(run))
    assert _losses(run) == _losses(straight)


@pytest.fixture(scope="module")
def straight_bf16(bpe_data, tmp_path_factory) -> Path:
    """Run A in bf16 autocast, the precision recipes train in."""
    root = tmp_path_factory.mktemp("straight-bf16")
    assert _pretrain(write_config(root / "config.yaml", root / "run", bpe_data.shards, precision="bf16")) == 0
    return root / "run"


@pytest.mark.slow  # differed from the straight run once in five full-suite runs, never alone: under investigation
def test_bf16_exact_resume_after_sigkill(straight_bf16, straight, bpe_data, tmp_path):
    run = tmp_path / "run"
    config = write_config(tmp_path / "config.yaml", run, bpe_data.shards, precision="bf16")
    assert _losses(straight_bf16) != _losses(straight), "bf16 autocast did not change the arithmetic"

    proc = _faulty_run(tmp_path, config, "kill-at", 9)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [6]

    assert _pretrain(config) == 0
    _assert_same_weights(_final(straight_bf16), _final(run))
    assert _losses(run) == _losses(straight_bf16)
