"""Classification and regression reports from predictions: accuracy, macro- and micro-F1, per-class precision /
recall / F1, confusion matrix; MSE, MAE, Pearson and Spearman correlation. Pure torch, checked against
scikit-learn / scipy. `evaluate_classifier` scores a classifier model on a labelled file."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["classification_report", "regression_report", "format_report", "evaluate_classifier"]


def _names(id2label: Mapping[int, str] | Sequence[str] | None, k: int) -> list[str]:
    if id2label is None:
        return [str(i) for i in range(k)]
    if isinstance(id2label, Mapping):
        return [str(id2label.get(i, i)) for i in range(k)]
    return [str(name) for name in id2label]


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0  # undefined (no predictions / no examples of a class) counts as 0, as sklearn


def classification_report(preds: Tensor | Sequence[int], targets: Tensor | Sequence[int],
                          id2label: Mapping[int, str] | Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1 (unweighted mean over every class of `id2label`, absent ones included), per-class
    precision / recall / F1 / support, and the confusion matrix (rows = true class, columns = predicted)."""
    p = torch.as_tensor(preds, dtype=torch.long).flatten()  # (N,)
    t = torch.as_tensor(targets, dtype=torch.long).flatten()  # (N,)
    if p.shape != t.shape or p.numel() == 0:
        raise ValueError(f"expected as many predictions as targets (and at least one), found {p.numel()} and "
                         f"{t.numel()}")
    k = len(id2label) if id2label is not None else int(max(p.max(), t.max())) + 1
    if int(min(p.min(), t.min())) < 0 or int(max(p.max(), t.max())) >= k:
        raise ValueError(f"class ids must be in [0, {k}), found [{int(min(p.min(), t.min()))}, "
                         f"{int(max(p.max(), t.max()))}]")
    names = _names(id2label, k)
    confusion = torch.bincount(t * k + p, minlength=k * k).view(k, k)  # (K true, K predicted)
    tp = confusion.diag().tolist()
    predicted, support = confusion.sum(0).tolist(), confusion.sum(1).tolist()
    per_class = {}
    for i, name in enumerate(names):
        fp, fn = predicted[i] - tp[i], support[i] - tp[i]
        per_class[name] = {"precision": _ratio(tp[i], predicted[i]), "recall": _ratio(tp[i], support[i]),
                           "f1": _ratio(2 * tp[i], 2 * tp[i] + fp + fn), "support": support[i]}
    # micro-F1 pools every class's counts: 2·Σtp / (2·Σtp + Σfp + Σfn), which equals accuracy for single-label data
    return {"task": "classify", "examples": p.numel(), "accuracy": sum(tp) / p.numel(),
            "macro_f1": sum(c["f1"] for c in per_class.values()) / k,
            "micro_f1": _ratio(2 * sum(tp), 2 * sum(tp) + (sum(predicted) - sum(tp)) + (sum(support) - sum(tp))),
            "labels": names, "per_class": per_class, "confusion": confusion.tolist()}


def _ranks(x: Tensor) -> Tensor:
    """Ranks 1..N with ties given their average rank (as scipy.stats.rankdata)."""
    sx, order = torch.sort(x, stable=True)  # (N,)
    _, inverse, counts = torch.unique_consecutive(sx, return_inverse=True, return_counts=True)
    last = counts.cumsum(0)  # (U,) 1-based rank of each distinct value's last copy
    average = (last - counts + 1 + last).to(x.dtype) / 2  # (U,)
    ranks = torch.empty_like(x)
    ranks[order] = average[inverse]
    return ranks


def _pearson(x: Tensor, y: Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    den = float((x.square().sum() * y.square().sum()).sqrt())
    return float((x * y).sum()) / den if den else math.nan  # constant input: undefined


def regression_report(preds: Tensor | Sequence[float], targets: Tensor | Sequence[float]) -> dict[str, Any]:
    """MSE, MAE, Pearson and Spearman correlation (NaN when either side is constant)."""
    p = torch.as_tensor(preds, dtype=torch.float64).flatten()  # (N,)
    t = torch.as_tensor(targets, dtype=torch.float64).flatten()  # (N,)
    if p.shape != t.shape or p.numel() == 0:
        raise ValueError(f"expected as many predictions as targets (and at least one), found {p.numel()} and "
                         f"{t.numel()}")
    return {"task": "regress", "examples": p.numel(), "mse": float((p - t).square().mean()),
            "mae": float((p - t).abs().mean()), "pearson": _pearson(p, t), "spearman": _pearson(_ranks(p), _ranks(t))}


def format_report(report: dict[str, Any]) -> str:
    """A small text table of a classification or regression report."""
    if report.get("task") == "regress":
        return "\n".join(f"{k:<9} {report[k]:.4f}" for k in ("mse", "mae", "pearson", "spearman")) + \
            f"\n{'examples':<9} {report['examples']}"
    names = report["labels"]
    w = max(12, *(len(n) + 2 for n in names))
    lines = [f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   "
             f"examples {report['examples']}", "",
             f"{'':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name in names:
        c = report["per_class"][name]
        lines.append(f"{name:<{w}}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['f1']:>10.4f}{c['support']:>10}")
    cw = max(8, *(len(n) + 2 for n in names))
    corner = "true \\ pred"
    lines += ["", f"{corner:<{w}}" + "".join(f"{n[:cw - 1]:>{cw}}" for n in names)]
    for name, row in zip(names, report["confusion"]):
        lines.append(f"{name:<{w}}" + "".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)


def evaluate_classifier(model, tokenizer, path, max_length: int = 128, batch_size: int = 16,
                        limit: int | None = None) -> tuple[dict[str, Any], list]:
    """(report, examples) of a classifier model (head="classifier") on `{"text", "label"}` records: the label
    names come from the model's id2label (a label the model does not know is an error naming file and line);
    one output (num_labels 1) is a regression report."""
    from ..data.classify import ClassifyCollate, ClassifyData, read_classification, tokenize_examples
    from ..data.examples import fixed_batches
    from ..objectives.classify import Classification

    cfg = model.cfg
    if cfg.head != "classifier":
        raise ValueError(f"cls: tasks need a classifier model (head='classifier'), this one has head={cfg.head!r}")
    task = "regress" if cfg.num_labels == 1 else "classify"
    names = cfg.id2label or {i: str(i) for i in range(cfg.num_labels)}
    label2id = {names[i]: i for i in range(cfg.num_labels)} if task == "classify" else None
    examples, _, _ = read_classification(path, ClassifyData(max_length=max_length), task, label2id=label2id)
    examples = examples[:limit]
    tokenized, truncated = tokenize_examples(examples, tokenizer, max_length)
    pad = tokenizer.padding_id
    objective = Classification(task, cfg.num_labels)
    preds, targets = objective.predict(model, fixed_batches(tokenized, batch_size, ClassifyCollate(pad, task)))
    report = classification_report(preds, targets, names) if task == "classify" else regression_report(preds, targets)
    report["truncated"] = truncated
    return report, examples
