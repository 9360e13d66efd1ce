"""Multiple-choice evaluation throughput: lmforge vs lm-evaluation-harness (`lm_eval`, model "hf") in one process.

The same task (MMLU-format questions built from standard-library docstrings, 4 choices, lm-eval's continuation
template), the same model (SmolLM2-135M-Instruct as a Hugging Face folder, fp32, CPU) and the same batch size on
both sides; lm-eval's model object is built once, outside the timing. Reports items/s, the ratio, and whether acc
and acc_norm are identical. Prints a table and a JSON line.

    python benchmarks/eval_throughput.py [--items 100] [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

TASK = "lmforge_stdlib_docstrings"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import lmforge
    from lmforge.eval.multiple_choice import evaluate_multiple_choice, read_multiple_choice
    from lmforge.eval.tasks import stdlib_docstring_items, write_lm_eval_task

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = write_lm_eval_task(tmp, stdlib_docstring_items(args.items), TASK)
        model, tok = lmforge.load("smollm2-135m-instruct")
        folder = lmforge.save(model, tok, tmp / "smollm2")
        items = read_multiple_choice(data)
        peer = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=args.batch_size)
        manager = TaskManager(include_path=str(tmp))
        best_ours = best_peer = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            ours = evaluate_multiple_choice(model, tok, items, batch_size=args.batch_size)
            best_ours = min(best_ours, time.perf_counter() - t)
            t = time.perf_counter()
            theirs = lm_eval.simple_evaluate(model=peer, tasks=[TASK], task_manager=manager)["results"][TASK]
            best_peer = min(best_peer, time.perf_counter() - t)
    n = len(items)
    result = {"items": n, "batch_size": args.batch_size, "ours_items_per_s": n / best_ours,
              "peer_items_per_s": n / best_peer, "ratio": best_peer / best_ours,
              "ours": {"acc": ours["acc"], "acc_norm": ours["acc_norm"]},
              "peer": {"acc": theirs["acc,none"], "acc_norm": theirs["acc_norm,none"]}}
    result["identical"] = result["ours"] == result["peer"]
    print(f"stdlib docstring multiple choice, {n} items x 4 choices, SmolLM2-135M fp32, CPU")
    print(f"{'':12} {'items/s':>8} {'acc':>7} {'acc_norm':>9}")
    print(f"{'lmforge':12} {result['ours_items_per_s']:8.2f} {ours['acc']:7.4f} {ours['acc_norm']:9.4f}")
    print(f"{'lm-eval hf':12} {result['peer_items_per_s']:8.2f} {theirs['acc,none']:7.4f} {theirs['acc_norm,none']:9.4f}")
    print(f"ratio {result['ratio']:.2f}x (target >= 1.5x), identical accuracy: {result['identical']}")
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
