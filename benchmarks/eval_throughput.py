"""Multiple-choice evaluation throughput: lmforge vs lm-evaluation-harness (`lm_eval`, model "hf"), timed two ways.

The same task (MMLU-format questions built from standard-library docstrings, 4 choices, lm-eval's continuation
template), the same model (SmolLM2-135M-Instruct as a Hugging Face folder, fp32, CPU) and the same batch size on
both sides, measured two ways so that each side is timed over the same span:

1. scoring: the model calls over requests that are already built. Ours: `evaluate_multiple_choice` on the read
   items (it tokenizes, scores and computes acc / acc_norm). lm-eval: `HFLM.loglikelihood` on the instances its
   task built (it tokenizes and scores); task building and result processing are done outside the timing, as
   reading the items is for ours. Both in one process, interleaved, best of --repeats.
2. whole command, each side in its own process: `lmforge evaluate --tasks mc:FILE` vs `lm_eval --model hf
   --include_path DIR --tasks NAME`, wall time from start to exit (imports, model load, task building, scoring,
   writing results). Both commands' acc and acc_norm are compared.

    python benchmarks/eval_throughput.py [--items 100] [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Record, add_out_argument

TASK = "lmforge_stdlib_docstrings"


def _timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    return seconds


def whole_commands(folder: Path, data: Path, tmp: Path, batch: int, repeats: int) -> dict:
    """Wall time of each side's command line in its own process; the acc / acc_norm each reports."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ours_cmd = [str(bin_dir / "lmforge"), "evaluate", f"model={folder}", f"tasks=[mc:{data}]", f"batch_size={batch}",
                f"output={tmp / 'ours-eval'}", "dtype=float32", "device=cpu"]
    peer_cmd = [str(bin_dir / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
                "--tasks", TASK, "--include_path", str(data.parent), "--batch_size", str(batch), "--device", "cpu",
                "--output_path", str(tmp / "peer-eval")]
    ours_s, peer_s = [], []
    for _ in range(repeats):
        ours_s.append(_timed(ours_cmd, env))
        peer_s.append(_timed(peer_cmd, env))
    ours = json.loads((tmp / "ours-eval" / "eval.json").read_text())
    ours = next(v for k, v in ours.get("tasks", ours).items() if isinstance(v, dict) and "acc" in v)
    peer = json.loads(max((tmp / "peer-eval").rglob("results_*.json")).read_text())["results"][TASK]
    return {"ours_s": min(ours_s), "peer_s": min(peer_s), "ours_runs_s": ours_s, "peer_runs_s": peer_s,
            "ratio": min(peer_s) / min(ours_s), "commands": [" ".join(ours_cmd[1:]), " ".join(peer_cmd[1:])],
            "ours": {"acc": ours["acc"], "acc_norm": ours["acc_norm"]},
            "peer": {"acc": float(peer["acc,none"]), "acc_norm": float(peer["acc_norm,none"])}}


def scoring(folder: Path, data: Path, batch: int, repeats: int) -> dict:
    """Best-of-`repeats` seconds of the scoring span on each side (one process, interleaved)."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    import lmforge
    from lmforge.eval.multiple_choice import evaluate_multiple_choice, read_multiple_choice

    model, tok = lmforge.load(folder)  # fp32
    items = read_multiple_choice(data)
    peer = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=batch)
    task = get_task_dict([TASK], TaskManager(include_path=str(data.parent)))[TASK]
    task.build_all_requests(rank=0, world_size=1)
    requests = [r for r in task.instances for _ in range(r.repeats)]
    evaluate_multiple_choice(model, tok, items[:2], batch_size=batch)  # warm-up (first-call kernel setup), untimed
    peer.loglikelihood(requests[:8])
    best_ours = best_peer = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        ours = evaluate_multiple_choice(model, tok, items, batch_size=batch)
        best_ours = min(best_ours, time.perf_counter() - t)
        t = time.perf_counter()
        peer.loglikelihood(requests)
        best_peer = min(best_peer, time.perf_counter() - t)
    return {"items": len(items), "requests": len(requests), "ours_s": best_ours, "peer_s": best_peer,
            "ours_items_per_s": len(items) / best_ours, "peer_items_per_s": len(items) / best_peer,
            "ratio": best_peer / best_ours, "ours_acc": ours["acc"], "ours_acc_norm": ours["acc_norm"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-commands", action="store_true", help="skip the whole-command measurement")
    add_out_argument(ap)
    args = ap.parse_args()
    rec = Record("eval_throughput", args, peers=["lm_eval", "transformers"],
                 sizes={"items": args.items, "batch_size": args.batch_size, "repeats": args.repeats})
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lmforge
    from lmforge.data.stdlib import stdlib_docstring_items
    from lmforge.eval.tasks import write_lm_eval_task

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = write_lm_eval_task(tmp / "task", stdlib_docstring_items(args.items), TASK)
        model, tok = lmforge.load("smollm2-135m-instruct")
        folder = Path(lmforge.save(model, tok, tmp / "smollm2"))
        del model
        result = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "device": "cpu",
                  "scoring": scoring(folder, data, args.batch_size, args.repeats)}
        if not args.no_commands:
            result["command"] = whole_commands(folder, data, tmp, args.batch_size, args.repeats)
    s, c = result["scoring"], result.get("command")
    print(f"stdlib docstring multiple choice, {s['items']} items x 4 choices, SmolLM2-135M fp32, CPU, "
          f"batch {args.batch_size}")
    print(f"{'span':44} {'ours s':>8} {'lm-eval s':>9} {'ratio':>6}")
    print(f"{'scoring (built requests -> log-likelihoods)':44} {s['ours_s']:8.2f} {s['peer_s']:9.2f} "
          f"{s['ratio']:6.2f}")
    if c:
        c["identical"] = c["ours"] == c["peer"]
        print(f"{'whole command, own process':44} {c['ours_s']:8.2f} {c['peer_s']:9.2f} {c['ratio']:6.2f}")
        print(f"acc / acc_norm: ours {c['ours']['acc']:.4f} / {c['ours']['acc_norm']:.4f}, lm-eval "
              f"{c['peer']['acc']:.4f} / {c['peer']['acc_norm']:.4f} (identical: {c['identical']})")
    rec.write(result)


if __name__ == "__main__":
    main()
