"""Generation tasks against lm-evaluation-harness: the same local task (stdlib doctest outputs, as prompt/target
and as GSM8K-format records with few-shot examples and the `#### N` regex) scored by `lm_eval.simple_evaluate(
model="hf")` and by lmforge's engine must have the same prompts, the same generations and the same exact match."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import lmforge
from lmforge.eval.generation import evaluate_generation, read_generation
from lmforge.eval.multiple_choice import build_requests, fewshot_prefix, read_multiple_choice
from lmforge.data.stdlib import stdlib_docstring_items, stdlib_doctest_gsm8k_items, stdlib_doctest_items
from lmforge.eval.tasks import write_lm_eval_generation_task, write_lm_eval_task
from lmforge.inference.engine import Engine
from lmforge.models import ModelConfig
from lmforge.models.transformer import Transformer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the parity reference: pip install lm_eval==0.4.13")


def doctest_records(n: int) -> list[dict]:
    return [{"prompt": r["prompt"], "target": r["target"]} for r in stdlib_doctest_items(n)]


def gsm8k_records(n: int) -> list[dict]:
    return [{k: r[k] for k in ("question", "answer")} for r in stdlib_doctest_gsm8k_items(n)]


def run_both(model, tok, folder: Path, tmp: Path, records: list[dict], num_fewshot: int, max_gen_toks: int):
    name = "lmforge_gen_parity"
    data = write_lm_eval_generation_task(tmp, records, name, max_gen_toks=max_gen_toks)
    items, spec = read_generation(data)
    ours = evaluate_generation(Engine(model, tok), tok, items, spec, num_fewshot=num_fewshot,
                               max_new_tokens=max_gen_toks)
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=[name],
                                  task_manager=TaskManager(include_path=str(tmp)), device="cpu", batch_size=8,
                                  num_fewshot=num_fewshot, log_samples=True)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return ours, out["results"][name], samples


def assert_parity(ours, theirs, samples, filter_name: str) -> None:
    assert len(samples) == ours["n"]
    for i, (mine, ref) in enumerate(zip(ours["per_item"], samples)):
        context = ref["arguments"][0][0]
        if i < 3:
            assert ours["examples"][i]["context"] == context  # the prompt, few-shot examples included
        assert mine["generation"] == ref["resps"][0][0], (i, mine, ref["resps"])
        assert mine["extracted"] == ref["filtered_resps"][0]
        assert float(mine["exact_match"]) == ref["exact_match"]
    assert ours["exact_match"] == pytest.approx(theirs[f"exact_match,{filter_name}"], abs=1e-12)


def test_tiny_random_model_generates_as_lm_eval(smollm2_gguf, tmp_path):
    tok = lmforge.load_tokenizer(smollm2_gguf)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=1024, initializer_range=0.2,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = Transformer(cfg).eval()
    folder = lmforge.save(model, tok, tmp_path / "tiny")
    ours, theirs, samples = run_both(model, tok, folder, tmp_path / "task", doctest_records(10), 0, 12)
    assert_parity(ours, theirs, samples, "none")
    assert any(len(p["generation"]) > 3 for p in ours["per_item"])  # it did generate, and cut at "\n" alike


@pytest.mark.parametrize("kind", ["generation", "multiple_choice"])
def test_fewshot_prompts_match_lm_eval(tmp_path, kind):
    """lm-eval's few-shot sampler (fixed seed 1234, the item left out) builds the same prompts as ours."""
    from lm_eval.tasks import TaskManager, get_task_dict

    if kind == "generation":
        data = write_lm_eval_generation_task(tmp_path, gsm8k_records(12), "fs")
        items, _ = read_generation(data)
        rnd = random.Random(1234)
        ours = [fewshot_prefix([it.shot for it in items], i, 3, rnd) + it.prompt for i, it in enumerate(items)]
    else:
        data = write_lm_eval_task(tmp_path, stdlib_docstring_items(12), "fs")
        ours = [ctx for ctx, _ in build_requests(read_multiple_choice(data), num_fewshot=3, seed=1234)]
    task = get_task_dict(["fs"], TaskManager(include_path=str(tmp_path)))["fs"]
    task.set_config(key="num_fewshot", value=3)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(rank=0, limit=None, world_size=1)
    theirs = {}
    for inst in task.instances:
        theirs.setdefault(inst.doc_id, inst.args[0])
    assert [theirs[i] for i in range(len(ours))] == ours


@pytest.mark.slow
def test_smollm2_gsm8k_format_fewshot_regex_matches_lm_eval(smollm2, tmp_path):
    model, tok = smollm2
    folder = lmforge.save(model, tok, tmp_path / "smollm2")
    ours, theirs, samples = run_both(model, tok, folder, tmp_path / "task", gsm8k_records(12), 3, 24)
    assert_parity(ours, theirs, samples, "strict-match")
    assert ours["invalid"] < 1.0  # with three worked examples the model writes "#### N" at least once
    assert "#### " in ours["examples"][0]["context"]  # few-shot answers are in the prompt
