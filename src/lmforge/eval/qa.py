"""Extractive question answering: score decoded answers (`objectives.span.decode_answers`) as the official SQuAD
scripts do (normalisation, exact match, token F1), break the scores down by question kind and by error, and a
lexical baseline to put a model's figure in context.

Scores are fractions in [0, 1]; the official evaluate-v1.1.py / evaluate-v2.0.py scripts print the same numbers as
percent. A data set without unanswerable questions is scored by v1.1's rules, one with them by v2.0's; the two
differ only on answers that normalise to "" (punctuation-only answers, see VERSIONS).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from ..data.qa import QAExample

__all__ = ["normalize_answer", "exact_match", "f1", "gold_texts", "squad_version", "squad_scores", "VERSIONS",
           "find_best_threshold", "threshold_inputs", "qa_report", "format_qa_report", "lexical_baseline",
           "ERROR_REASONS"]

ERROR_REASONS = ("empty_prediction", "answered_unanswerable", "partial_overlap", "no_overlap")
"""Why a prediction is wrong (F1 < 1): nothing said for an answerable question, an answer to an unanswerable one,
some gold tokens found, none found. A prediction missing from the map counts as "missing_prediction"."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


# ----------------------------------------------------------------------------------------------------------------
# normalisation and per-question scores

def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation, in its order: lower case, drop ASCII punctuation, replace the articles
    a/an/the (whole words) by a space, collapse whitespace. EM and F1 compare these strings."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


VERSIONS = ("1.1", "2.0")
"""The official scripts' rules: evaluate-v1.1.py keeps every gold answer and gives F1 0 when no token is shared
(even two empty answers); evaluate-v2.0.py drops golds that normalise to "", reads none left as "no answer", and
gives an empty side F1 1 only against another empty side. An empty gold list (unanswerable) is scored by v2.0's."""


def _gold_norms(golds: Sequence[str], version: str) -> list[str]:
    """The normalised golds under `version`'s rules ([""] stands for "no answer")."""
    norms = [normalize_answer(g) for g in golds]
    return ([n for n in norms if n] or [""]) if version == "2.0" else norms


def _rules(golds: Sequence[str], version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, found {version!r}")
    return version if golds else "2.0"  # only v2.0 has unanswerable questions


def _token_f1(pred: list[str], gold: list[str], version: str) -> float:
    if version == "2.0" and (not pred or not gold):  # an empty side matches only another empty side
        return float(pred == gold)
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, golds: Sequence[str], version: str = "2.0") -> float:
    """1.0 when the normalised prediction equals any normalised gold answer (under `version`'s rules, see
    VERSIONS), else 0.0; an empty gold list means unanswerable (1.0 iff the prediction normalises to "")."""
    version = _rules(golds, version)
    p = normalize_answer(prediction)
    return float(any(p == g for g in _gold_norms(golds, version)))


def f1(prediction: str, golds: Sequence[str], version: str = "2.0") -> float:
    """Token-bag F1 (whitespace tokens of the normalised strings, multiset overlap), the max over the gold answers
    (under `version`'s rules, see VERSIONS); an empty gold list means unanswerable (1.0 iff the prediction
    normalises to "")."""
    version = _rules(golds, version)
    p = normalize_answer(prediction).split()
    return max(_token_f1(p, g.split(), version) for g in _gold_norms(golds, version))


def gold_texts(example: Any) -> list[str]:
    """The gold answer texts of a QAExample ([] when it is unanswerable)."""
    return [answer[0] for answer in example.answers]


# ----------------------------------------------------------------------------------------------------------------
# dataset scores

def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _stderr(values: Sequence[float]) -> float:
    """Standard error of the mean (sample standard deviation / sqrt n); NaN below two values."""
    n = len(values)
    if n < 2:
        return math.nan
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def squad_version(examples: Sequence[QAExample]) -> str:
    """The official script whose rules score `examples`: "2.0" when any question is unanswerable, else "1.1"."""
    return "2.0" if any(not e.answers for e in examples) else "1.1"


def squad_scores(examples: Sequence[QAExample], answers: Mapping[str, str],
                 version: str | None = None) -> dict[str, Any]:
    """Exact match and F1 as fractions in [0, 1] (the official scripts print percent): means over the examples of
    the per-question max over gold answers, with their standard errors, under the rules of `version` (default
    `squad_version(examples)`; see VERSIONS). With unanswerable examples present, also has_answer_* / no_answer_*
    over each group (0.0 for an empty group). A missing prediction scores 0 and is counted under "missing"."""
    if not examples:
        raise ValueError("expected at least one example to score, found none")
    version = version or squad_version(examples)
    em: dict[bool, list[float]] = {True: [], False: []}
    fs: dict[bool, list[float]] = {True: [], False: []}
    missing = 0
    for example in examples:
        has = bool(example.answers)
        pred = answers.get(example.id)
        if pred is None:
            missing += 1
            em[has].append(0.0)
            fs[has].append(0.0)
            continue
        golds = gold_texts(example)
        em[has].append(exact_match(pred, golds, version))
        fs[has].append(f1(pred, golds, version))
    every_em, every_f1 = em[True] + em[False], fs[True] + fs[False]
    out: dict[str, Any] = {"rules": f"squad-v{version}", "exact_match": _mean(every_em), "f1": _mean(every_f1),
                           "examples": len(every_em),
                           "exact_match_stderr": _stderr(every_em), "f1_stderr": _stderr(every_f1)}
    if em[False]:
        out.update({"has_answer_exact_match": _mean(em[True]), "has_answer_f1": _mean(fs[True]),
                    "has_answer_examples": len(em[True]), "no_answer_exact_match": _mean(em[False]),
                    "no_answer_f1": _mean(fs[False]), "no_answer_examples": len(em[False])})
    if missing:
        out["missing"] = missing
    return out


def threshold_inputs(decoded: Sequence[Mapping[str, Any]]) -> tuple[dict[str, str], dict[str, float]]:
    """(answers, na_probs) for find_best_threshold from decode_answers' output: each example's best span text
    ("" when it has none) and null_score - score, the quantity decode_answers compares with null_threshold."""
    answers = {d["id"]: (d["n_best"][0]["text"] if d["n_best"] else "") for d in decoded}
    diffs = {d["id"]: (math.inf if not d["n_best"] else d["null_score"] - d["score"]) for d in decoded}
    return answers, diffs


def find_best_threshold(examples: Sequence[QAExample], answers: Mapping[str, str],
                        na_probs: Mapping[str, float]) -> dict[str, float]:
    """The no-answer threshold that maximises EM and F1, by the official v2.0 search: an example answers "" when
    na_probs[id] > threshold. Sweeps the examples by rising na_prob, starting from "all answer ''" at threshold 0.0
    (as the official script, which expects probabilities); the best thresholds can be given to decode_answers as
    null_threshold when na_probs are null_score - score (see threshold_inputs)."""
    if not examples:
        raise ValueError("expected at least one example, found none")
    lacking = [e.id for e in examples if e.id not in answers or e.id not in na_probs]
    if lacking:
        raise ValueError(f"expected an answer and a na_prob for every example; {len(lacking)} lack one "
                         f"(first: {lacking[0]!r})")
    raw_em = {e.id: exact_match(answers[e.id], gold_texts(e)) for e in examples}
    raw_f1 = {e.id: f1(answers[e.id], gold_texts(e)) for e in examples}
    order = sorted(examples, key=lambda e: na_probs[e.id])
    no_answer = sum(1 for e in examples if not e.answers)

    def sweep(raw: Mapping[str, float]) -> tuple[float, float]:
        current = best = float(no_answer)  # every example answers "": exactly the unanswerable ones are right
        threshold = 0.0
        for e in order:  # from here on e answers its prediction
            current += raw[e.id] if e.answers else (-1.0 if answers[e.id] else 0.0)
            if current > best:
                best, threshold = current, float(na_probs[e.id])
        return best / len(examples), threshold

    best_em, em_threshold = sweep(raw_em)
    best_f1, f1_threshold = sweep(raw_f1)
    return {"best_exact_match": best_em, "best_exact_match_threshold": em_threshold, "best_f1": best_f1,
            "best_f1_threshold": f1_threshold}


# ----------------------------------------------------------------------------------------------------------------
# reports

def _answer_map(decoded: Sequence[Mapping[str, Any]] | Mapping[str, str]) -> Mapping[str, str]:
    if isinstance(decoded, Mapping):
        return decoded
    return {d["id"]: d["answer"] for d in decoded}


def qa_report(examples: Sequence[QAExample], decoded: Sequence[Mapping[str, Any]] | Mapping[str, str], *,
              kinds: Mapping[str, str] | None = None, show: int = 20) -> dict[str, Any]:
    """squad_scores, plus "per_kind" scores when `kinds` maps example id -> question kind (ids it lacks go to
    "other"), "wrong" (how many have F1 < 1), "error_reasons" (how many of them per reason, see ERROR_REASONS) and
    "errors": the `show` worst {"id", "question", "gold", "predicted", "f1"}, by F1 then id. `decoded` is
    decode_answers' output or a map id -> answer text."""
    answers = _answer_map(decoded)
    version = squad_version(examples)
    report = squad_scores(examples, answers, version)
    if kinds is not None:
        groups: dict[str, list[Any]] = {}
        for example in examples:
            groups.setdefault(str(kinds.get(example.id, "other")), []).append(example)
        report["per_kind"] = {kind: squad_scores(group, answers, version) for kind, group in sorted(groups.items())}
    reasons = Counter({reason: 0 for reason in ERROR_REASONS})
    wrong = []
    for example in examples:
        golds = gold_texts(example)
        pred = answers.get(example.id)
        score = 0.0 if pred is None else f1(pred, golds, version)
        if score >= 1.0:
            continue
        if pred is None:
            reason = "missing_prediction"
        elif example.answers and not normalize_answer(pred):
            reason = "empty_prediction"
        elif not example.answers:
            reason = "answered_unanswerable"
        else:
            reason = "partial_overlap" if score > 0 else "no_overlap"
        reasons[reason] += 1
        wrong.append({"id": example.id, "question": example.question, "gold": golds, "predicted": pred, "f1": score})
    wrong.sort(key=lambda w: (w["f1"], w["id"]))
    report.update({"wrong": len(wrong), "error_reasons": dict(reasons), "errors": wrong[:max(0, show)]})
    return report


def _scores_line(label: str, s: Mapping[str, Any], prefix: str = "") -> str:
    return (f"{label:<14} EM {100 * s[prefix + 'exact_match']:6.2f}   F1 {100 * s[prefix + 'f1']:6.2f}   "
            f"examples {s[prefix + 'examples']}")


def format_qa_report(report: Mapping[str, Any]) -> str:
    """A few console lines of a qa_report (EM / F1 shown as percent, like the official scripts)."""
    lines = [_scores_line("all", report)]
    if "no_answer_examples" in report:
        lines += [_scores_line("has answer", report, "has_answer_"), _scores_line("no answer", report, "no_answer_")]
    for kind, scores in report.get("per_kind", {}).items():
        lines.append(_scores_line(f"  {kind}", scores))
    if report.get("missing"):
        lines.append(f"missing predictions: {report['missing']}")
    if "wrong" in report:
        why = ", ".join(f"{reason.replace('_', ' ')} {n}" for reason, n in report["error_reasons"].items() if n)
        lines.append(f"wrong (F1 < 1): {report['wrong']}" + (f" ({why})" if why else ""))
    for error in report.get("errors", [])[:5]:
        gold = " | ".join(error["gold"]) or "(no answer)"
        lines.append(f"  F1 {error['f1']:.2f}  {error['id']}: predicted {error['predicted']!r}, gold {gold!r}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# lexical baseline

_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+|\s*\n\s*")


def _sentences(text: str) -> list[str]:
    """Sentences of `text`: split after . ! ? (optionally closed by a quote or bracket) before whitespace, and at
    line breaks. A plain rule, good enough for a baseline (it also splits after abbreviations such as "U.S.")."""
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]


def lexical_baseline(example: Any) -> str:
    """The context sentence sharing the most distinct normalised words with the question (ties: the first one):
    the word-overlap method a QA model should beat. "" for an empty context."""
    question = set(normalize_answer(example.question).split())
    best, best_overlap = "", -1
    for sentence in _sentences(example.context):
        overlap = len(question & set(normalize_answer(sentence).split()))
        if overlap > best_overlap:
            best, best_overlap = sentence, overlap
    return best
