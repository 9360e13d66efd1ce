"""DDP, ZeRO-1, ZeRO-2, FSDP2 (ZeRO-3) and tensor parallelism on 2 gloo ranks (CPU) match one process with the same
global batch; checkpoints move between world sizes and layouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_fixtures import run_torchrun
from safetensors.torch import load_file

from lmforge import cli

# constant schedule: the 2-rank runs stop at step 6 of the single run's 12, so the lr must not depend on the total
CONFIG = """
model: {{preset: llama-tiny}}
data: {{train: [{shards}], seq_len: 64}}
train: {{steps: 6, micro_batch: 4, grad_accum: 1, log_every: 1, eval_every: 3, eval_batches: 2, save_every: 3,
         tensorboard: false, precision: fp32, progress_bar: false, optimizer: {{lr: 3.0e-3}},
         schedule: {{name: constant, warmup_steps: 2}}}}
"""


def _losses(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _read_train_dir(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["data"]["train"][0]


def _torchrun(config: Path, run: Path, *overrides: str) -> None:
    run_torchrun(2, "lmforge", "pretrain", "--config", str(config), f"run_dir={run}", *overrides)


@pytest.fixture(scope="module")
def config(bpe_data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "config.yaml"
    path.write_text(CONFIG.format(shards=bpe_data.shards))
    return path


@pytest.fixture(scope="module")
def single(config, tmp_path_factory) -> Path:
    """One process, global batch 8 as 4 x 2 accumulation, 12 steps."""
    run = tmp_path_factory.mktemp("single") / "run"
    assert cli.main(["pretrain", "--config", str(config), f"run_dir={run}", "train.grad_accum=2",
                     "train.steps=12", "train.save_every=6"]) == 0
    return run


@pytest.mark.parametrize("parallel", ["ddp", "zero1", "zero2", "fsdp", "tp", "tp-sequence"])
def test_two_ranks_match_one_process_and_resume_on_one(parallel, config, single, tmp_path):
    run = tmp_path / parallel
    # 6 steps, global batch 8 = 4 x 2 ranks; under tp the two ranks hold one replica: 4 x 2 accumulated
    layout = ["train.parallel.tp=2", "train.grad_accum=2"] if parallel.startswith("tp") else \
        [f"train.parallel={parallel}"]
    layout += ["train.parallel.sequence=true"] if parallel == "tp-sequence" else []
    _torchrun(config, run, *layout)
    ref, got = _losses(single), _losses(run)
    for step in range(1, 7):
        assert abs(got[step]["loss"] - ref[step]["loss"]) <= 1e-5, (step, got[step]["loss"], ref[step]["loss"])
        assert abs(got[step]["grad_norm"] - ref[step]["grad_norm"]) <= 1e-4
    assert abs(got[6]["val_loss"] - ref[6]["val_loss"]) <= 1e-5  # the same validation windows
    # the 2-rank checkpoint resumes in one process (global batch kept by accumulation)
    assert cli.main(["pretrain", "--config", str(config), f"run_dir={run}", "train.grad_accum=2",
                     "train.steps=12", "train.save_every=6"]) == 0
    got = _losses(run)
    assert sorted(got) == sorted(ref)
    for step in range(7, 13):
        assert abs(got[step]["loss"] - ref[step]["loss"]) <= 1e-5, (step, got[step]["loss"], ref[step]["loss"])
    a, b = load_file(str(run / "final" / "model.safetensors")), load_file(str(single / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    assert torch.isfinite(torch.stack([v.float().abs().max() for v in a.values()])).all()


def test_continued_pretraining_starts_from_the_trained_model(config, single, tmp_path):
    run = tmp_path / "continued"
    assert cli.main(["pretrain", "--config", str(config), f"run_dir={run}", f"model.init_from={single / 'final'}",
                     "train.steps=2", "train.save_every=0", "train.eval_every=0"]) == 0
    first_scratch = _losses(single)[1]["loss"]
    first_continued = _losses(run)[1]["loss"]
    assert first_continued < first_scratch - 0.1
    # bits per byte use the validation split's own bytes per token
    val = json.loads((run / "eval.json").read_text())
    split = json.loads((Path(_read_train_dir(config)) / "index.json").read_text())["splits"]["validation"]
    assert val["val_bpb"] == pytest.approx(val["val_loss"] / math.log(2) / (split["bytes"] / split["tokens"]))
    lineage = json.loads((run / "lmforge.json").read_text())
    assert lineage["parent"] == str(single / "final") and lineage["data"][0]["tokenizer"]


@pytest.mark.parametrize("parallel", ["zero2", "tp"])
def test_one_process_checkpoint_resumes_under_zero_and_tensor_parallel(parallel, config, single, tmp_path):
    """The other direction: a one-process checkpoint (step 6 of 12) continues on 2 ranks as if uninterrupted."""
    run = tmp_path / f"from-one-{parallel}"
    assert cli.main(["pretrain", "--config", str(config), f"run_dir={run}", "train.grad_accum=2",
                     "train.steps=6", "train.save_every=6"]) == 0
    layout = ["train.parallel.tp=2", "train.grad_accum=2"] if parallel == "tp" else [f"train.parallel={parallel}"]
    _torchrun(config, run, "train.steps=12", "train.save_every=6", *layout)
    ref, got = _losses(single), _losses(run)
    assert sorted(got) == sorted(ref)
    for step in range(7, 13):
        assert abs(got[step]["loss"] - ref[step]["loss"]) <= 1e-5, (step, got[step]["loss"], ref[step]["loss"])
