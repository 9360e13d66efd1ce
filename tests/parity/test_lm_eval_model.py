"""`--model lmforge` in lm-evaluation-harness against `--model hf` on the same weights and the same local tasks:
multiple choice (log-likelihoods), generate_until (greedy text, exact_match), loglikelihood_rolling (perplexity),
chat templates, and lm-eval's own CLI through `python -m lmforge.eval.lm_eval_model`."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.data.stdlib import stdlib_docstring_items
from lmforge.eval.tasks import write_lm_eval_task
from lmforge.models import ModelConfig
from lmforge.models.transformer import Transformer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the parity reference: pip install lm_eval==0.4.13")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmforge.eval.lm_eval_model import LMForgeLM, main  # noqa: E402  (registers "lmforge")

MC, GEN, ROLL = "lmf_mc", "lmf_gen", "lmf_roll"
PROMPTS = [("What is 2 + 2?", "4"), ("What is 3 + 5?", "8"), ("What is 10 - 7?", "3"),
           ("Capital of France?", "Paris"), ("Opposite of hot?", "cold"), ("Color of the sky?", "blue"),
           ("What is 6 * 7?", "42"), ("First letter?", "A")]


def write_tasks(folder: Path, n_mc: int = 8) -> Path:
    """A multiple-choice, a generate_until and a loglikelihood_rolling task (JSONL + YAML) in `folder`."""
    write_lm_eval_task(folder, stdlib_docstring_items(n_mc), MC)
    gen = folder / f"{GEN}.jsonl"
    gen.write_text("".join(json.dumps({"prompt": f"Question: {q}\nAnswer:", "target": f" {a}"}) + "\n"
                           for q, a in PROMPTS))
    (folder / f"{GEN}.yaml").write_text(
        f"task: {GEN}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {gen}\n"
        "output_type: generate_until\ntest_split: test\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 16\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    roll = folder / f"{ROLL}.jsonl"
    roll.write_text("".join(json.dumps({"page": inspect.getsource(f)[:1200]}) + "\n" for f in (json.dumps, json.loads)))
    metrics = "".join(f"  - metric: {m}\n    aggregation: {a}\n    higher_is_better: false\n" for m, a in
                      [("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                       ("bits_per_byte", "bits_per_byte")])
    (folder / f"{ROLL}.yaml").write_text(
        f"task: {ROLL}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {roll}\n"
        'output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ""\ndoc_to_target: "{{page}}"\n'
        f"metric_list:\n{metrics}metadata:\n  version: 1.0\n")
    return folder


def run(model: str, model_args: str, task_dir: Path, tasks: list[str], **kw) -> dict:
    """lm_eval.simple_evaluate on CPU with per-sample records (only our task folder is indexed: it is faster)."""
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, device="cpu", batch_size=4,
                                   task_manager=manager, log_samples=True, **kw)


def both(folder: Path, task_dir: Path, tasks: list[str], extra: str = "", **kw) -> tuple[dict, dict]:
    """(ours, hf) results of the same tasks on the same HF folder, fp32."""
    ours = run("lmforge", f"path={folder},dtype=float32{extra}", task_dir, tasks, **kw)
    theirs = run("hf", f"pretrained={folder},dtype=float32{extra}", task_dir, tasks, **kw)
    return ours, theirs


def by_doc(out: dict, task: str) -> list[dict]:
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def tiny(smollm2_gguf, tmp_path_factory) -> Path:
    """HF folder of a tiny random Llama with SmolLM2's real tokenizer and chat template."""
    torch.manual_seed(0)
    tok = lmforge.load_tokenizer(smollm2_gguf)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=512, initializer_range=0.2,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return lmforge.save(Transformer(cfg).eval(), tok, tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tiny_runs(tiny, task_dir) -> tuple[dict, dict]:
    """All three tasks through both models once; max_length=64 makes contexts truncate and documents roll."""
    return both(tiny, task_dir, [MC, GEN, ROLL], extra=",max_length=64")


def test_registered_next_to_lm_eval_models():
    from lm_eval.api.registry import get_model

    assert get_model("lmforge") is LMForgeLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still found


def test_multiple_choice_matches_hf(tiny_runs):
    ours, theirs = tiny_runs
    mine, ref = by_doc(ours, MC), by_doc(theirs, MC)
    assert len(mine) == 8
    for a, b in zip(mine, ref):
        assert a["arguments"] == b["arguments"]
        lls_a, lls_b = [float(r[0]) for r in a["filtered_resps"]], [float(r[0]) for r in b["filtered_resps"]]
        assert max(abs(x - y) for x, y in zip(lls_a, lls_b)) < 1e-3, (lls_a, lls_b)
        assert (a["acc"], a["acc_norm"]) == (b["acc"], b["acc_norm"])
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][MC][metric] == theirs["results"][MC][metric]


def test_generate_until_matches_hf(tiny_runs):
    ours, theirs = tiny_runs
    mine, ref = by_doc(ours, GEN), by_doc(theirs, GEN)
    texts = [s["filtered_resps"][0] for s in mine]
    assert texts == [s["filtered_resps"][0] for s in ref]
    assert all("\n" not in t and "<|im_end|>" not in t for t in texts)
    assert len(set(texts)) > 1 and any(t.strip() for t in texts)  # real, differing continuations were compared
    assert [s["exact_match"] for s in mine] == [s["exact_match"] for s in ref]
    assert ours["results"][GEN]["exact_match,none"] == theirs["results"][GEN]["exact_match,none"]


def test_loglikelihood_rolling_matches_hf(tiny_runs):
    ours, theirs = tiny_runs
    for a, b in zip(by_doc(ours, ROLL), by_doc(theirs, ROLL)):
        assert abs(float(a["filtered_resps"][0]) - float(b["filtered_resps"][0])) < 1e-2
    assert ours["results"][ROLL]["bits_per_byte,none"] == pytest.approx(theirs["results"][ROLL]["bits_per_byte,none"],
                                                                        rel=1e-5)
    assert ours["results"][ROLL]["bits_per_byte,none"] > 3  # a random model: far from compressing the text


def test_chat_template_generation_matches_hf(tiny, task_dir):
    ours, theirs = both(tiny, task_dir, [GEN], apply_chat_template=True, limit=4)
    mine, ref = by_doc(ours, GEN), by_doc(theirs, GEN)
    assert mine[0]["arguments"][0][0].startswith("<|im_start|>system\n")  # the template was applied
    assert [s["arguments"] for s in mine] == [s["arguments"] for s in ref]
    assert [s["filtered_resps"] for s in mine] == [s["filtered_resps"] for s in ref]


def test_request_edge_cases_match_hflm(tiny):
    """Empty contexts (scored after the prefix token), trailing spaces, a continued final chat message."""
    from lm_eval.models.huggingface import HFLM

    ours = LMForgeLM(path=str(tiny), dtype="float32", device="cpu", batch_size=2)
    ref = HFLM(pretrained=str(tiny), dtype="float32", device="cpu", batch_size=2)
    reqs = [Instance("loglikelihood", {}, args, i) for i, args in
            enumerate([("", " hello world"), ("", "<|im_start|>user"), ("The answer is ", "42")])]
    mine, theirs = ours.loglikelihood(reqs, disable_tqdm=True), ref.loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(mine, theirs):
        assert abs(a - b) < 1e-3 and ga == gb, (a, b)
    # an empty continuation is certain; HFLM asserts instead
    assert ours.loglikelihood([Instance("loglikelihood", {}, ("x", ""), 0)], disable_tqdm=True) == [(0.0, True)]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello, I am"}]
    for gen_prompt, messages in [(False, chat), (True, chat[:2])]:
        assert ours.apply_chat_template(messages, gen_prompt) == ref.apply_chat_template(messages, gen_prompt)
    assert ours.tok_encode("<|im_start|>user") == ref.tok_encode("<|im_start|>user")


def test_lora_adapter_matches_hf_peft(tiny, tmp_path):
    """adapter=FOLDER equals `--model hf --model_args peft=FOLDER`: scores and greedy text."""
    pytest.importorskip("peft")
    from lm_eval.models.huggingface import HFLM

    from lmforge.transforms import LoraConfig, apply_lora, save_adapter

    model, _ = lmforge.load(tiny)
    apply_lora(model, LoraConfig(rank=4, targets=["q", "v", "down"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tiny))
    base = LMForgeLM(path=str(tiny), dtype="float32", device="cpu", batch_size=2)
    ours = LMForgeLM(path=str(tiny), adapter=str(tmp_path / "adapter"), dtype="float32", device="cpu", batch_size=2)
    ref = HFLM(pretrained=str(tiny), peft=str(tmp_path / "adapter"), dtype="float32", device="cpu", batch_size=2)
    ll = [Instance("loglikelihood", {}, (f"Question: {q}\nAnswer:", f" {a}"), i)
          for i, (q, a) in enumerate(PROMPTS[:4])]
    mine, theirs = ours.loglikelihood(ll, disable_tqdm=True), ref.loglikelihood(ll, disable_tqdm=True)
    assert max(abs(a[0] - b[0]) for a, b in zip(mine, theirs)) < 1e-3, (mine, theirs)
    assert max(abs(a[0] - b[0]) for a, b in zip(mine, base.loglikelihood(ll, disable_tqdm=True))) > 1e-2
    gen = [Instance("generate_until", {}, (f"Question: {q}\nAnswer:", {"until": ["\n"], "max_gen_toks": 8}), i)
           for i, (q, _) in enumerate(PROMPTS[:3])]
    assert ours.generate_until(gen, disable_tqdm=True) == ref.generate_until(gen, disable_tqdm=True)


def test_bad_arguments_are_named(tiny):
    with pytest.raises(ValueError, match="path=MODEL"):
        LMForgeLM()
    with pytest.raises(ValueError, match="dtype"):
        LMForgeLM(path=str(tiny), dtype="float99")
    with pytest.raises(ValueError, match="max_length"):
        LMForgeLM(path=str(tiny), max_length=4096)
    lm = LMForgeLM(path=str(tiny), device="cpu")
    with pytest.raises(ValueError, match="num_beams"):
        lm.generate_until([Instance("generate_until", {}, ("Hi", {"until": ["\n"], "num_beams": 4}), 0)])


def test_cli_writes_results(tiny, task_dir, tmp_path):
    """`python -m lmforge.eval.lm_eval_model` is lm-eval's CLI, arguments verbatim, with the model registered."""
    args = ["--model", "lmforge", "--model_args", f"path={tiny},dtype=float32", "--tasks", MC,
            "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "4", "--limit", "3",
            "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run([sys.executable, "-m", "lmforge.eval.lm_eval_model", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    data = json.loads(results.read_text())
    assert data["config"]["model"] == "lmforge" and data["results"][MC]["acc,none"] in (0, 1 / 3, 2 / 3, 1)
    assert len(list((tmp_path / "out").rglob(f"samples_{MC}_*.jsonl"))) == 1
    assert callable(main)


@pytest.mark.slow
def test_smollm2_generation_matches_hf(smollm2, task_dir, tmp_path):
    """The real SmolLM2-135M-Instruct: same greedy answers, same exact_match as `--model hf`."""
    model, tok = smollm2
    folder = lmforge.save(model, tok, tmp_path / "smollm2")
    ours, theirs = both(folder, task_dir, [GEN, MC])
    assert [s["filtered_resps"] for s in by_doc(ours, GEN)] == [s["filtered_resps"] for s in by_doc(theirs, GEN)]
    assert ours["results"][GEN]["exact_match,none"] == theirs["results"][GEN]["exact_match,none"]
    assert ours["results"][MC]["acc,none"] == theirs["results"][MC]["acc,none"]
