"""`lmforge reward` and `lmforge dpo` end to end on a tiny random Llama saved with the real SmolLM2 tokenizer and
chat template, on real pairs built from the Python standard library's docstrings: losses go down, only trainable
parameters change, the reference never does (so precomputed and live references give the same run), resume is
exact, outputs load (the reward model through `serve`'s /v1/classify too), bad data names file and line.

The `slow` tests train the real SmolLM2-135M-Instruct with LoRA and check the learning signal on held-out pairs."""

from __future__ import annotations

import http.client
import importlib
import inspect
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from engine_fixtures import dump_config

import lmforge
from lmforge import cli
from lmforge.config import ConfigError, load_config
from lmforge.engine.trainer import Trainer

MODULES = ["json", "textwrap", "shlex", "base64", "string", "fnmatch", "posixpath", "heapq", "bisect", "statistics",
           "colorsys", "calendar", "difflib", "glob", "csv", "copy", "random", "functools", "operator", "ipaddress",
           "fractions", "math", "itertools", "os", "shutil", "re", "zlib", "binascii", "html", "urllib.parse",
           "datetime", "collections", "pathlib", "tempfile", "hashlib", "struct", "secrets", "uuid", "gzip",
           "pprint", "keyword", "unicodedata", "locale", "time", "zipfile", "tarfile", "pickle", "inspect"]


def doc_pairs(n: int | None = None, seed: int = 0) -> list[dict]:
    """Real preference pairs from the standard library: "What does json.loads do?" -> the first sentence of its
    docstring (chosen) or of another function's (rejected)."""
    facts = {}
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        for name in sorted(getattr(mod, "__all__", None) or dir(mod)):
            obj = getattr(mod, name, None)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            first = " ".join(doc.split("\n\n")[0].split())
            first = first.split(". ")[0].rstrip(".") + "."
            if 20 <= len(first) <= 160 and "(" not in first[:len(name) + 2] and first not in facts.values():
                facts[f"{mod_name}.{name}"] = first
    names = sorted(facts)
    rng = random.Random(seed)
    rng.shuffle(names)
    names = names[:n] if n else names
    out = []
    for i, name in enumerate(names):
        other = names[(i + 1 + rng.randrange(len(names) - 1)) % len(names)]
        out.append({"prompt": f"What does the Python function {name} do? Answer in one sentence.",
                    "chosen": facts[name], "rejected": facts[other]})
    return out


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny models are latency-bound: one thread avoids waiting on a second one when the cores are shared."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    from lmforge.models.loading import load_tokenizer

    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def tiny(tok, tmp_path_factory) -> Path:
    """A random 2-layer Llama over SmolLM2's vocabulary, saved with SmolLM2's tokenizer and chat template."""
    from lmforge.models import ModelConfig, Transformer
    from lmforge.models.loading import save

    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, max_position_embeddings=256, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id)
    try:
        return save(Transformer(cfg), tok, tmp_path_factory.mktemp("align") / "tiny")
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("align-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in doc_pairs(32)))
    return path


def _run(verb: str, tmp_path: Path, name: str, base: Path, data: Path, **over) -> Path:
    run = tmp_path / name
    cfg = {"run_dir": str(run), "method": "lora", "model": {"init_from": str(base)},
           "data": {"train": [str(data)], "validation": [str(data)], "max_length": 96},
           "lora": {"rank": 4, "alpha": 8},
           "train": {"steps": 6, "micro_batch": 4, "log_every": 1, "eval_batches": 2, "tensorboard": False,
                     "progress_bar": False, "precision": "fp32", "device": "cpu", "optimizer": {"lr": 1e-2},
                     "schedule": {"warmup_steps": 0}}}
    dump_config(cfg, tmp_path / f"{name}.yaml", **over)
    assert cli.main([verb, "--config", str(tmp_path / f"{name}.yaml")]) == 0
    return run


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(run) if "loss" in r}


@pytest.fixture
def spy(monkeypatch):
    """Snapshots of every parameter (and the objective's reference model) before and after `Trainer.fit`."""
    seen: dict = {}
    fit = Trainer.fit

    def wrapped(self):
        def snap(m):
            return {n: p.detach().clone() for n, p in m.named_parameters()} if m is not None else None
        ref = getattr(self.objective, "ref_model", None)
        seen.update(before=snap(self.model), ref_before=snap(ref),
                    trainable={n for n, p in self.model.named_parameters() if p.requires_grad})
        out = fit(self)
        seen.update(after=snap(self.model), ref_after=snap(ref))
        return out

    monkeypatch.setattr(Trainer, "fit", wrapped)
    return seen


def _only_trainable_changed(seen: dict) -> None:
    assert seen["trainable"]
    for n, p in seen["before"].items():
        if n in seen["trainable"]:
            assert not torch.equal(p, seen["after"][n]), f"trainable {n} did not change"
        else:
            assert torch.equal(p, seen["after"][n]), f"frozen {n} changed"


# ---- reward


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reward_model_trains_saves_and_serves(tiny, pairs, tok, tmp_path, spy, method):
    lr = 1e-2 if method == "lora" else 3e-3
    run = _run("reward", tmp_path, method, tiny, pairs, method=method,
               **{"train.steps": 8, "train.optimizer.lr": lr, "train.eval_batches": None})
    result = json.loads((run / "eval.json").read_text())
    assert result["val_loss"] < result["before"]["val_loss"]  # Bradley–Terry loss went down on the pairs
    assert result["val_accuracy"] > 0.5 and result["val_margin"] > result["before"]["val_margin"]
    _only_trainable_changed(spy)
    if method == "lora":
        assert any(n.startswith("score.") for n in spy["trainable"])  # the new head trains (modules_to_save)
        assert all(n.startswith("score.") or "lora_" in n for n in spy["trainable"])
    model, tok2 = lmforge.load(run / "final")
    assert model.cfg.head == "classifier" and model.cfg.num_labels == 1
    lineage = json.loads((run / "lmforge.json").read_text())
    assert lineage["stage"] == "reward" and lineage["parent"] == str(tiny)
    if method == "lora":  # the adapter (PEFT layout, head as modules_to_save) on the base gives the same rewards
        adapted, _ = lmforge.load(run / "adapter")
        ids = torch.tensor([tok.encode("def f(x):")])
        torch.testing.assert_close(adapted(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
        return
    # serve's /v1/classify on a 1-output model answers the scalar reward of the rendered conversation
    from lmforge.data.preference import read_pairs, scoring_text, tokenize_pairs
    from lmforge.inference.bridge import AsyncEngine
    from lmforge.inference.engine import Engine, EngineConfig
    from lmforge.inference.http import start_server
    from lmforge.inference.routes import create_app

    pair = read_pairs(pairs)[0]
    ex = tokenize_pairs([pair], tok, 96, close_truncated=True)[0]
    ids = torch.tensor([ex.prompt + ex.chosen])
    with torch.no_grad():  # the mask matters: SmolLM2's pad token is its end-of-turn token, which the head reads
        want = model(ids, attention_mask=torch.ones_like(ids)).logits[0, 0].item()
    ae = AsyncEngine(Engine(model, tok2, EngineConfig(kv_cache_gb=0.05)))
    server = start_server(create_app(ae, tok2, "rm"), port=0)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        text = scoring_text(tok, pair.prompt, pair.chosen[0]["content"])
        conn.request("POST", "/v1/classify", body=json.dumps({"input": [text]}),
                     headers={"Content-Type": "application/json"})
        out = json.loads(conn.getresponse().read())
        assert out[0]["scores"] is None and out[0]["output"] == pytest.approx(want, abs=1e-4)
    finally:
        server.stop()
        ae.close()


# ---- dpo and friends


@pytest.mark.parametrize("loss", ["dpo", "ipo", "kto", "simpo", "orpo"])
def test_every_loss_trains_and_logs_its_metrics(tiny, pairs, tmp_path, spy, loss):
    run = _run("dpo", tmp_path, loss, tiny, pairs, loss=loss)
    result = json.loads((run / "eval.json").read_text())
    assert result["val_loss"] < result["before"]["val_loss"]
    row = next(r for r in _metrics(run) if r["step"] == 1)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "loss"} <= set(row)
    if loss != "kto":
        assert {"rewards/margin", "rewards/accuracy", "logps/rejected"} <= set(row)
    if loss in ("dpo", "ipo", "simpo"):  # orpo's step is mostly its SFT term
        assert result["val_rewards/margin"] > result["before"]["val_rewards/margin"]
        assert result["val_logps/margin"] > result["before"]["val_logps/margin"]  # the policy's own preference
    _only_trainable_changed(spy)
    assert all("lora_" in n for n in spy["trainable"])
    model, tok = lmforge.load(run / "final")  # merged
    adapted, _ = lmforge.load(run / "adapter")
    ids = torch.tensor([tok.encode("What does json.loads do?")])
    torch.testing.assert_close(adapted(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    lineage = json.loads((run / "lmforge.json").read_text())
    assert lineage["loss"] == loss and lineage["reference"] == ("none" if loss in ("simpo", "orpo") else "adapters_off")


@pytest.mark.parametrize("method, reference", [("lora", "adapters_off"), ("full", "copy")])
def test_the_reference_never_changes(tiny, pairs, tmp_path, spy, method, reference):
    """A live reference (adapters off, or a frozen copy) gives the run that log-probs precomputed once give."""
    live = _run("dpo", tmp_path, "live", tiny, pairs, method=method, **{"train.steps": 4})
    if reference == "copy":  # the copy did not move while the model trained
        assert spy["ref_before"] is not None
        assert all(torch.equal(v, spy["ref_after"][k]) for k, v in spy["ref_before"].items())
        assert not all(torch.equal(v, spy["after"][k]) for k, v in spy["before"].items())
    else:
        _only_trainable_changed(spy)  # the base, which is the reference, stays
    pre = _run("dpo", tmp_path, "pre", tiny, pairs, method=method, precompute_reference=True, **{"train.steps": 4})
    assert spy["ref_before"] is None  # no reference model in memory while training
    a, b = _losses(live), _losses(pre)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)
    ra, rb = (json.loads((r / "eval.json").read_text()) for r in (live, pre))
    assert ra["val_rewards/margin"] == pytest.approx(rb["val_rewards/margin"], abs=1e-4)


def test_dpo_resume_is_exact(tiny, pairs, tmp_path):
    import shutil

    from safetensors.torch import load_file

    run = _run("dpo", tmp_path, "run", tiny, pairs, **{"train.save_every": 2, "train.steps": 4})
    straight = _losses(run)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    shutil.rmtree(run / "checkpoints" / "step-000004")  # as if the run had died after step 2
    _run("dpo", tmp_path, "run", tiny, pairs, **{"train.save_every": 2, "train.steps": 4})
    assert _losses(run) == straight
    again = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], adapter[k]) for k in adapter)


@pytest.mark.parametrize("over, needle", [
    ({"loss": "simpo", "reference": "copy"}, "simpo uses no reference model"),
    ({"loss": "dpo", "reference": "none"}, "compares the policy with a reference"),
    ({"method": "full", "reference": "adapters_off"}, "adapters_off needs method lora"),
    ({"loss": "orpo", "precompute_reference": True}, "nothing to precompute"),
    ({"beta": 0.0}, "beta must be > 0"),
])
def test_dpo_config_combinations_are_checked(tmp_path, over, needle):
    from lmforge.stages import dpo

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"train": ["x.jsonl"]}, **over}))
    with pytest.raises(ConfigError, match=needle):
        load_config(dpo.Config, tmp_path / "c.yaml")


@pytest.mark.parametrize("verb", ["reward", "dpo"])
def test_bad_preference_data_names_file_and_line(tiny, tmp_path, capsys, verb):
    data = tmp_path / "bad.jsonl"
    good = {"prompt": "Say hi.", "chosen": "hi", "rejected": "bye"}
    data.write_text("\n".join(json.dumps(r) for r in [good, good, {"prompt": "q", "chosen": "a"}]) + "\n")
    cfg = {"run_dir": str(tmp_path / "r"), "model": {"init_from": str(tiny)}, "data": {"train": [str(data)]},
           "train": {"device": "cpu", "progress_bar": False}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main([verb, "--config", str(tmp_path / "c.yaml")]) == 2  # bad input
    err = capsys.readouterr().err
    assert f"{data}:3" in err and "missing 'rejected'" in err


# ---- learning signals on the real SmolLM2-135M-Instruct (minutes)


@pytest.fixture(scope="module")
def real_pairs(tmp_path_factory) -> tuple[Path, Path]:
    """~300 real docstring pairs: a training file and a held-out file with other functions."""
    rows = doc_pairs(seed=1)
    root = tmp_path_factory.mktemp("real-pairs")
    train, val = root / "train.jsonl", root / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[64:]))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    return train, val


def _real(verb: str, tmp_path: Path, smollm2_gguf: Path, real_pairs, **over) -> dict:
    train, val = real_pairs
    run = _run(verb, tmp_path, verb, smollm2_gguf, train, **{
        "data.validation": [str(val)], "data.max_length": 128, "lora.rank": 16, "lora.alpha": 32,
        "train.precision": "bf16", "train.micro_batch": 8, "train.eval_batches": None, "train.log_every": 5,
        **over})
    result = json.loads((run / "eval.json").read_text())
    print(f"\n{verb}: " + json.dumps({"before": result["before"], "after": {k: v for k, v in result.items()
                                                                         if k.startswith("val_")}}, indent=1))
    return result


@pytest.mark.slow
def test_real_reward_model_ranks_held_out_pairs(smollm2_gguf, real_pairs, tmp_path):
    r = _real("reward", tmp_path, smollm2_gguf, real_pairs, **{"train.steps": 40, "train.optimizer": {"lr": 5e-4},
                                                             "train.schedule": {"warmup_steps": 4}})
    assert r["val_accuracy"] >= 0.65 and r["val_accuracy"] > r["before"]["val_accuracy"] + 0.1


@pytest.mark.slow
def test_real_dpo_raises_held_out_preference(smollm2_gguf, real_pairs, tmp_path):
    r = _real("dpo", tmp_path, smollm2_gguf, real_pairs, **{"train.steps": 30, "train.optimizer": {"lr": 5e-4},
                                                          "train.schedule": {"warmup_steps": 3}})
    assert r["val_rewards/accuracy"] > 0.6 and r["val_rewards/margin"] > 0
    assert r["val_logps/accuracy"] > r["before"]["val_logps/accuracy"]
    assert r["val_logps/margin"] > r["before"]["val_logps/margin"]
