"""Multiple-choice evaluation against lm-evaluation-harness: the same local task (stdlib docstring questions)
scored by `lm_eval.simple_evaluate(model="hf")` and by lmforge must pick the same choice on every item."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest

import lmforge
from lmforge.eval.harness import rolling_loglikelihood
from lmforge.eval.multiple_choice import evaluate_multiple_choice, read_multiple_choice
from lmforge.data.stdlib import stdlib_docstring_items
from lmforge.eval.tasks import write_lm_eval_task
from lmforge.models import ModelConfig
from lmforge.models.transformer import Transformer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the parity reference: pip install lm_eval==0.4.13")

TASK = "lmforge_stdlib_docstrings"


def write_task(tmp: Path, n: int) -> Path:
    """The JSONL data and the lm-eval task YAML (MMLU continuation template) in `tmp`; returns the data file."""
    return write_lm_eval_task(tmp, stdlib_docstring_items(n), TASK)


def run_lm_eval(folder: Path, task_dir: Path, limit: int | None = None) -> tuple[dict, list[dict]]:
    """lm-eval's metrics and per-sample records for the task on the HF folder, CPU fp32, batch size 8."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=[TASK],
                                  task_manager=TaskManager(include_path=str(task_dir)), device="cpu",
                                  batch_size=8, limit=limit, log_samples=True)
    return out["results"][TASK], out["samples"][TASK]


def assert_parity(model, tok, folder: Path, tmp: Path, n: int) -> None:
    data = write_task(tmp, n)
    ours = evaluate_multiple_choice(model, tok, read_multiple_choice(data), batch_size=8)
    theirs, samples = run_lm_eval(folder, tmp)
    samples = sorted(samples, key=lambda s: s["doc_id"])
    # lm-eval's prompts are ours, character for character
    for example, sample in zip(ours["examples"], samples):
        assert [tuple(a) for a in sample["arguments"]] == [(example["context"], c) for c in example["continuations"]]
    for mine, ref in zip(ours["per_item"], samples):
        ref_lls = [r[0] for r in ref["filtered_resps"]]
        assert max(abs(a - float(b)) for a, b in zip(mine["loglikelihoods"], ref_lls)) < 1e-3, (mine, ref_lls)
        assert mine["gold"] == ref["target"]
    assert ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"], (ours, theirs)
    assert [it["pred"] == it["gold"] for it in ours["per_item"]] == [s["acc"] == 1.0 for s in samples]
    assert [it["pred_norm"] == it["gold"] for it in ours["per_item"]] == [s["acc_norm"] == 1.0 for s in samples]


def _tiny(smollm2_gguf, tmp_path):
    """A tiny random Llama with SmolLM2's real tokenizer, and its HF folder."""
    tok = lmforge.load_tokenizer(smollm2_gguf)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=512, initializer_range=0.2,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = Transformer(cfg).eval()
    return model, tok, lmforge.save(model, tok, tmp_path / "tiny")


def test_tiny_random_llama_matches_lm_eval(smollm2_gguf, tmp_path):
    model, tok, folder = _tiny(smollm2_gguf, tmp_path)
    assert_parity(model, tok, folder, tmp_path, n=20)


@pytest.mark.slow  # a minute on 2 cores; the tiny random model above runs the same parity by default
def test_smollm2_matches_lm_eval(smollm2, tmp_path):
    model, tok = smollm2
    folder = lmforge.save(model, tok, tmp_path / "smollm2")
    assert_parity(model, tok, folder, tmp_path, n=20)


def test_rolling_loglikelihood_matches_lm_eval(smollm2_gguf, tmp_path):
    """Perplexity windows: our rolling sum equals HFLM.loglikelihood_rolling with a short max_length."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok, folder = _tiny(smollm2_gguf, tmp_path)
    text = inspect.getsource(json.dumps)[:1500]
    ref = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4, max_length=64)
    (theirs,) = ref.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    ours, n = rolling_loglikelihood(model, tok.encode(text), max_length=64, prefix_token_id=prefix)
    assert n == len(tok.encode(text)) > 64 * 3
    assert abs(ours - theirs) < 1e-2 * max(1.0, abs(theirs) / 100), (ours, theirs)
