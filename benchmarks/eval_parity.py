"""Evaluation parity with lm-evaluation-harness: the same local tasks scored by lmforge and by `lm_eval` (model
"hf") on the same weights, per task and model, as a table and a JSON line.

Tasks (built at run time from the standard library, written as lm-eval task folders by `eval/tasks.py`):
- stdlib-mc: multiple choice by log-likelihood (acc, acc_norm), zero-shot and 3-shot;
- stdlib-doctest: generation until newline, exact match;
- doctest-gsm8k: GSM8K-format questions, 3-shot, lm-eval's gsm8k stop sequences, strict-match regex and
  normalisation.
Models: a tiny random Llama with SmolLM2's tokenizer, and SmolLM2-135M-Instruct, both fp32.

    python benchmarks/eval_parity.py [--items 40] [--gen-items 20] [--models tiny,smollm2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from common import Record, add_out_argument


def _tiny(tok):
    import torch

    from lmforge.models import ModelConfig
    from lmforge.models.transformer import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=2048, initializer_range=0.2,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return Transformer(cfg).eval()


def _lm_eval(folder: Path, task_dir: Path, name: str, num_fewshot: int, batch_size: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=[name],
                                  task_manager=TaskManager(include_path=str(task_dir)), device="cpu",
                                  batch_size=batch_size, num_fewshot=num_fewshot)
    return out["results"][name]


def run(model, tok, folder: Path, tmp: Path, args) -> list[dict]:
    from lmforge.eval.generation import evaluate_generation, read_generation
    from lmforge.eval.multiple_choice import evaluate_multiple_choice, read_multiple_choice
    from lmforge.data.stdlib import stdlib_docstring_items, stdlib_doctest_gsm8k_items, stdlib_doctest_items
    from lmforge.eval.tasks import write_lm_eval_generation_task, write_lm_eval_task
    from lmforge.inference.engine import Engine

    rows = []
    mc_dir = tmp / "mc"
    data = write_lm_eval_task(mc_dir, stdlib_docstring_items(args.items), "parity_mc")
    for shots in (0, 3):
        ours = evaluate_multiple_choice(model, tok, read_multiple_choice(data), num_fewshot=shots, batch_size=8)
        theirs = _lm_eval(folder, mc_dir, "parity_mc", shots, 8)
        for m in ("acc", "acc_norm"):
            rows.append({"task": f"stdlib-mc {shots}-shot", "n": ours["n"], "metric": m, "ours": ours[m],
                         "lm_eval": theirs[f"{m},none"]})
    gen_tasks = [("stdlib-doctest 0-shot", [{"prompt": r["prompt"], "target": r["target"]}
                                            for r in stdlib_doctest_items(args.gen_items)], 0, 16, "none"),
                 ("doctest-gsm8k 3-shot", [{k: r[k] for k in ("question", "answer")}
                                           for r in stdlib_doctest_gsm8k_items(args.gen_items)], 3, 32,
                  "strict-match")]
    for i, (name, records, shots, max_gen, filt) in enumerate(gen_tasks):
        task_dir = tmp / f"gen{i}"
        data = write_lm_eval_generation_task(task_dir, records, f"parity_gen{i}", max_gen_toks=max_gen)
        items, spec = read_generation(data)
        ours = evaluate_generation(Engine(model, tok), tok, items, spec, num_fewshot=shots, max_new_tokens=max_gen)
        theirs = _lm_eval(folder, task_dir, f"parity_gen{i}", shots, 8)
        rows.append({"task": name, "n": ours["n"], "metric": "exact_match", "ours": ours["exact_match"],
                     "lm_eval": theirs[f"exact_match,{filt}"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=40, help="multiple-choice questions")
    ap.add_argument("--gen-items", type=int, default=20, help="generation questions per task")
    ap.add_argument("--models", default="tiny,smollm2")
    add_out_argument(ap)
    args = ap.parse_args()
    rec = Record("eval_parity", args, peers=["lm_eval", "transformers"],
                 sizes={"items": args.items, "gen_items": args.gen_items, "models": args.models})
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lmforge

    results = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in args.models.split(","):
            model, tok = lmforge.load("smollm2-135m-instruct")
            if name == "tiny":
                model = _tiny(tok)
            folder = lmforge.save(model, tok, tmp / name)
            for row in run(model, tok, folder, tmp / f"tasks-{name}", args):
                row["lm_eval"] = float(row["lm_eval"])  # numpy scalars from lm-eval
                results.append({"model": name, **row, "identical": row["ours"] == row["lm_eval"]})
    print("| model | task | n | metric | lmforge | lm-eval (hf) | identical |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['model']} | {r['task']} | {r['n']} | {r['metric']} | {r['ours']:.4f} | {r['lm_eval']:.4f} | "
              f"{'yes' if r['identical'] else 'NO'} |")
    rec.write({"rows": results})


if __name__ == "__main__":
    main()
