"""Extractive QA on real text: `recipes/finetune/qa-minilm.yaml` (MiniLM, all-minilm-l6-v2, full fine-tuning of a
new span head) against the same recipe from random weights (`model.random_init=true`: same architecture, tokenizer,
data, steps and schedule) and a lexical baseline (the context sentence sharing the most words with the question).

Data: the stdlib QA set (`{qa}`, data/qa_data.py) built on this machine: questions about the standard library's
documented functions, contexts = signature line + docstring, answers exact spans; split by module. The recipe
trains on `train` and validates on `validation`; every arm is scored on `validation` (the recipe's final report)
and on `test` (modules neither arm saw, through `lmforge evaluate --tasks qa:{qa}/test.jsonl`). Scores are SQuAD's
exact match and token F1 (fractions), per question kind too, of answers decoded in fp32 (the recipe's own final
report, `run_validation_f1`, runs under its bf16 autocast). Each training run and each evaluation is its own
process (`lmforge` on the command line), one after another; wall time of the training command is recorded.

    python benchmarks/finetune_qa.py [--steps N] [--work DIR]
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

from common import Record, add_out_argument, load_average

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finetune" / "qa-minilm.yaml"
ARMS = {"pretrained": [], "random init": ["model.random_init=true"]}


def lmforge(args: list[str], env: dict[str, str]) -> float:
    """Run the lmforge command line in a fresh process; its wall seconds (a failure stops the benchmark)."""
    t = time.perf_counter()
    cmd = [sys.executable, "-c", "import sys; from lmforge import cli; sys.exit(cli.main(sys.argv[1:]))", *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"lmforge {' '.join(args)}: exit {done.returncode}")
    return time.perf_counter() - t


def kinds(path: Path) -> dict[str, str]:
    """Question id -> kind (does, default, returns, raises, param) of a stdlib QA file."""
    return {r["id"]: r["kind"] for r in map(json.loads, path.read_text().splitlines())}


def scores(answers: dict[str, str], kind_of: dict[str, str], examples) -> dict:
    """Exact match and F1 overall and per kind, from a report's per-example answers."""
    from lmforge.eval.qa import qa_report

    rep = qa_report(examples, answers, kinds=kind_of, show=0)
    return {"exact_match": rep["exact_match"], "f1": rep["f1"], "examples": rep["examples"], "rules": rep["rules"],
            "exact_match_stderr": rep["exact_match_stderr"], "f1_stderr": rep["f1_stderr"],
            "per_kind": {k: {"exact_match": v["exact_match"], "f1": v["f1"], "examples": v["examples"]}
                         for k, v in rep["per_kind"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's train.steps (a quick look)")
    ap.add_argument("--work", default=None, help="scratch folder for the runs (default: a new temporary one)")
    add_out_argument(ap)
    args = ap.parse_args()
    rec = Record("finetune_qa", args, sizes={"recipe": str(RECIPE.relative_to(ROOT))})
    work = Path(args.work or tempfile.mkdtemp(prefix="lmforge-qa-"))
    env = dict(os.environ, LMFORGE_CACHE=str(work / "cache"))
    os.environ["LMFORGE_CACHE"] = env["LMFORGE_CACHE"]

    import yaml

    import lmforge as lmforge_api
    from lmforge.data.qa import QAData, read_qa
    from lmforge.data.readers import expand_placeholders
    from lmforge.eval.qa import lexical_baseline
    from lmforge.objectives.span import answer_questions

    settings = QAData(**yaml.safe_load(RECIPE.read_text())["data"]["qa"])

    folder = Path(expand_placeholders("{qa}/train.jsonl")).parent  # builds the set once, before any timing
    splits = {s: read_qa(folder / f"{s}.jsonl")[0] for s in ("validation", "test")}
    kind_of = {**kinds(folder / "validation.jsonl"), **kinds(folder / "test.jsonl")}
    rows: dict[str, dict] = {}
    for arm, extra in ARMS.items():
        run = work / arm.replace(" ", "-")
        over = [f"run_dir={run}", *extra] + ([f"train.steps={args.steps}"] if args.steps else [])
        load = load_average()
        train_s = lmforge(["finetune", "--config", str(RECIPE), *over], env)
        val = json.loads((run / "eval.json").read_text())
        test_dir = run / "test-eval"
        lmforge(["evaluate", "--model", str(run / "final"), "--tasks", "qa:{qa}/test.jsonl", "--output",
                 str(test_dir), "--max-length", str(settings.max_length), "--stride", str(settings.doc_stride)], env)
        test = json.loads((test_dir / "eval.json").read_text())["tasks"]["qa:{qa}/test.jsonl"]
        model, tok = lmforge_api.load(run / "final")
        answers = {s: {a["id"]: a["answer"] for a in answer_questions(model, tok, ex, settings, batch_size=16)}
                   for s, ex in splits.items()}
        rows[arm] = {split: scores(answers[split], kind_of, splits[split]) for split in splits}
        if abs(test["f1"] - rows[arm]["test"]["f1"]) > 1e-6:  # `lmforge evaluate` scored the same answers
            raise SystemExit(f"{arm} test: lmforge evaluate's F1 {test['f1']} differs from {rows[arm]['test']}")
        rows[arm].update(train_seconds=round(train_s, 1), load_avg_before=load, load_avg_after=load_average(),
                         val_loss=val.get("val_loss"), run_validation_f1=val["report"]["f1"])
    rows["lexical baseline"] = {split: scores({e.id: lexical_baseline(e) for e in ex}, kind_of, ex)
                                for split, ex in splits.items()}
    print(f"{'':<18} {'val EM':>7} {'val F1':>7} {'test EM':>8} {'test F1':>8}")
    for name, r in rows.items():
        print(f"{name:<18} {r['validation']['exact_match']:>7.4f} {r['validation']['f1']:>7.4f} "
              f"{r['test']['exact_match']:>8.4f} {r['test']['f1']:>8.4f}")
    rec.write({"data": {s: len(ex) for s, ex in splits.items()}, "recipe": str(RECIPE.relative_to(ROOT)),
               "results": rows})


if __name__ == "__main__":
    main()
