#!/usr/bin/env python
"""Build the alignment data sets from real data on this machine (no download, nothing hand-typed).

Writes into --output (default data/align; generated, git-ignored):
  code_pairs.{train,test}.jsonl        HumanEval preference pairs: canonical solution (chosen, passes in the
                                       sandbox) vs an AST mutation of it that fails the tests (rejected)
  doc_pairs.{train,test}.jsonl         "What does `mod.func` do?": its docstring summary vs another function's
  kto_doc.{train,test}.jsonl           doc_pairs as unpaired KTO records
  doctest_prompts.{train,test}.jsonl   RL prompts with a checkable answer (what a stdlib doctest prints), chat form
  doctest_prompts_plain.{...}.jsonl    the same, plain form (the transcript, continued by the output)
  humaneval_prompts.{train,test}.jsonl RL prompts for code rewards (prompt, tests, entry point), same split as
                                       code_pairs
  manifest.json, README.md             counts, sha256 of each file, inputs, settings, seconds

The builders live in lmforge.data.align_data; the sandbox runs ~2 programs per HumanEval problem (about 30-60 s
with 2 workers). Usage:
  python scripts/build_align_data.py [--output data/align] [--workers 2] [--seed 0] [--per-problem 1]
"""

from __future__ import annotations

import argparse
import sys
import time

from lmforge.data.align_data import write_align_data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", default="data/align", help="folder to write (default: data/align)")
    ap.add_argument("--workers", type=int, default=2, help="sandboxed programs run at once (default: 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the mutation order, rejected picks and splits")
    ap.add_argument("--per-problem", type=int, default=1, help="code pairs (distinct failing mutations) per problem")
    ap.add_argument("--code-test-fraction", type=float, default=0.2, help="HumanEval tasks held out (by task_id hash)")
    ap.add_argument("--doc-test-fraction", type=float, default=0.1, help="stdlib modules held out (by module hash)")
    ap.add_argument("--doctest-test-fraction", type=float, default=0.2, help="docstrings held out (by name hash)")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.per_problem < 1:
        ap.error("--workers and --per-problem must be >= 1")
    start = time.perf_counter()
    manifest = write_align_data(args.output, workers=args.workers, seed=args.seed, per_problem=args.per_problem,
                                code_test_fraction=args.code_test_fraction,
                                doc_test_fraction=args.doc_test_fraction,
                                doctest_test_fraction=args.doctest_test_fraction,
                                progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    names = sorted({f.rsplit(".", 2)[0] for f in manifest["files"]})
    print(f"{'set':<24}{'train':>8}{'test':>8}  seconds")
    for name in names:
        tr, te = (manifest["files"][f"{name}.{s}.jsonl"]["records"] for s in ("train", "test"))
        print(f"{name:<24}{tr:>8}{te:>8}  {manifest['seconds'].get(name, 0):.1f}")
    print(f"code mutation kinds: {manifest['code_mutation_kinds']}")
    print(f"wrote {args.output}/ (manifest.json, README.md) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
