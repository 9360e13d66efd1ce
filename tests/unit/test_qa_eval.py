"""Extractive-QA decoding and SQuAD scoring: the official normalisation, EM / F1 on hand-worked cases, dataset scores
(v1.1 and v2.0 groups), span decoding over overlapping windows (n-best, max length, context-only spans, the v2
null threshold) checked against a brute-force O(T^2) reference, the v2 threshold search, the report and the
lexical baseline."""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmforge.objectives.span import decode_answers
from lmforge.eval.qa import (exact_match, f1, find_best_threshold, format_qa_report,
                             lexical_baseline, normalize_answer, qa_report, squad_scores, threshold_inputs)

try:
    from lmforge.data.qa import QAExample, QAFeature
except ImportError:  # the data module is written alongside; the fields are the contract's
    @dataclass(slots=True)
    class QAExample:  # type: ignore[no-redef]
        id: str
        question: str
        context: str
        answers: list
        where: str

    @dataclass(slots=True)
    class QAFeature:  # type: ignore[no-redef]
        example: int
        input_ids: list
        token_type_ids: list | None
        offsets: list
        start: int
        end: int
        cls_index: int

MINI = Path(__file__).resolve().parents[1] / "data" / "squad-v1.1-mini.json"
MINI_V2 = MINI.with_name("squad-v2.0-mini.json")


def _ex(id_: str, golds: list[str], context: str = "", question: str = "q?") -> QAExample:
    return QAExample(id=id_, question=question, context=context, answers=[(g, 0) for g in golds], where="test")


# ------------------------------------------------------------------------------------------------ normalisation

def test_normalize_answer_official_rules_and_order():
    assert normalize_answer("The  Quick, brown\tfox!") == "quick brown fox"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theater anthem") == "theater anthem"  # articles only as whole words
    assert normalize_answer("Don't stop: A.M.") == "dont stop am"
    # punctuation goes before articles: "the-cat" -> "thecat" (no article left); the other order gives "cat"
    assert normalize_answer("the-cat") == "thecat"
    assert normalize_answer("\u201cquoted\u201d") == "\u201cquoted\u201d"  # string.punctuation is ASCII only
    assert normalize_answer("  The  ") == ""


def test_exact_match_cases():
    assert exact_match("The Eiffel Tower", ["eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower", "Eiffel!"]) == 1.0  # any gold
    assert exact_match("tower", ["eiffel tower"]) == 0.0
    assert exact_match("", ["x"]) == 0.0
    # v2.0: no gold answer = unanswerable; a prediction normalising to "" is right
    assert exact_match("", []) == 1.0
    assert exact_match("the", []) == 1.0
    assert exact_match("1990", []) == 0.0


def test_f1_partial_overlap_by_hand():
    # pred [barn], gold [red, barn, door]: common 1, P = 1/1, R = 1/3, F1 = 2*(1/3)/(4/3) = 0.5
    assert f1("barn", ["red barn door"]) == pytest.approx(0.5)
    # pred [levis, stadium, in, santa, clara] vs gold [levis, stadium]: P = 2/5, R = 1, F1 = 0.8/1.4 = 4/7;
    # vs gold [santa, clara, california]: P = 2/5, R = 2/3, F1 = (8/15)/(16/15) = 1/2; max = 4/7
    assert f1("Levi's Stadium in Santa Clara", ["Santa Clara, California", "Levi's Stadium"]) == pytest.approx(4 / 7)
    # bag counts: pred [red, red] vs gold [red]: common 1, P = 1/2, R = 1, F1 = 1/1.5 = 2/3
    assert f1("red red", ["red"]) == pytest.approx(2 / 3)
    assert f1("The Red barn.", ["red BARN"]) == 1.0
    assert f1("blue", ["red barn"]) == 0.0
    assert f1("", ["red barn"]) == 0.0
    # v2.0 unanswerable: 1 iff both sides have no tokens
    assert f1("", []) == 1.0
    assert f1("an", []) == 1.0
    assert f1("red", []) == 0.0
    assert f1("", ["The"]) == 1.0  # golds that normalise to "" count as "no answer", as evaluate-v2.0.py


# ------------------------------------------------------------------------------------------------ dataset scores

def _seven():
    examples = [_ex("q1", ["Denver Broncos"]), _ex("q2", ["Santa Clara, California", "Levi's Stadium"]),
                _ex("q3", ["1966"]), _ex("q4", ["gold"]), _ex("q5", []), _ex("q6", []),
                _ex("q7", ["Beyonc\u00e9 Knowles"])]
    answers = {"q1": "the Denver Broncos", "q2": "Levi's Stadium in Santa Clara", "q3": "1967", "q4": "",
               "q5": "", "q6": "in 1990"}  # q7 has no prediction
    return examples, answers


def test_squad_scores_by_hand():
    examples, answers = _seven()
    s = squad_scores(examples, answers)
    # per question (EM, F1): q1 (1, 1); q2 (0, 4/7) (see test_f1_partial_overlap_by_hand); q3 (0, 0); q4 "" vs
    # gold (0, 0); q5 unanswerable + "" (1, 1); q6 unanswerable + answer (0, 0); q7 missing (0, 0)
    # EM = 2/7; F1 = (1 + 4/7 + 1)/7 = 18/49; answerable q1-q4,q7: EM 1/5, F1 (1 + 4/7)/5 = 11/35; q5,q6: 1/2, 1/2
    assert s["exact_match"] == pytest.approx(2 / 7)
    assert s["f1"] == pytest.approx(18 / 49)
    assert s["examples"] == 7 and s["missing"] == 1
    assert s["has_answer_exact_match"] == pytest.approx(1 / 5) and s["has_answer_f1"] == pytest.approx(11 / 35)
    assert s["has_answer_examples"] == 5 and s["no_answer_examples"] == 2
    assert s["no_answer_exact_match"] == pytest.approx(0.5) and s["no_answer_f1"] == pytest.approx(0.5)
    # v1.1 data (every question answerable): no group keys; scores are fractions
    v1 = squad_scores(examples[:4], answers)
    assert set(v1) == {"rules", "exact_match", "f1", "examples", "exact_match_stderr", "f1_stderr"}
    assert v1["rules"] == "squad-v1.1" and s["rules"] == "squad-v2.0"
    assert v1["exact_match"] == pytest.approx(1 / 4) and v1["f1"] == pytest.approx((1 + 4 / 7) / 4)
    # EM values (1, 0, 0, 0): sample variance (3·(1/4)² + (3/4)²)/3 = 1/4, stderr sqrt(1/4 / 4) = 1/4
    assert v1["exact_match_stderr"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="at least one example"):
        squad_scores([], {})


def _squad_file(path: Path) -> list[QAExample]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [QAExample(id=qa["id"], question=qa["question"], context=p["context"],
                      answers=[(a["text"], a["answer_start"]) for a in qa["answers"]], where=str(path))
            for article in data["data"] for p in article["paragraphs"] for qa in p["qas"]]


@pytest.mark.skipif(not MINI.exists(), reason="tests/data/squad-v1.1-mini.json not written yet")
def test_squad_scores_on_v1_mini_file():
    examples = _squad_file(MINI)
    answers = {
        "json-p1-q1": "dumps()",  # "dumps": 1, 1
        "json-p1-q2": "null.",  # 1, 1
        "json-p1-q3": "2008 release",  # [2008, release] vs [2008]: P 1/2, R 1 -> 2/3 (vs [in, 2008]: 1/2); EM 0
        # [simplejson, package] vs [thirdparty, simplejson, package]: P 1, R 2/3 -> 0.8 (vs [simplejson]: 2/3)
        "json-p1-q4": "simplejson package",
        "json-p2-q1": "ValueError",  # 0, 0
        "json-p2-q2": "the object_hook argument",  # "_" is punctuation: "objecthook argument" = gold 2: 1, 1
        "bruges-p1-q1": "Zwin inlet",  # [zwin, inlet] vs [zwin]: 2/3; vs [tidal, inlet, called, zwin]: P 1, R 1/2
    }  # bruges-p1-q2 missing: 0, 0
    # EM = 3/8; F1 = (1 + 1 + 2/3 + 4/5 + 0 + 1 + 2/3 + 0)/8 = (77/15)/8 = 77/120
    s = squad_scores(examples, answers)
    assert s["examples"] == 8 and s["missing"] == 1 and "no_answer_examples" not in s
    assert s["exact_match"] == pytest.approx(3 / 8) and s["f1"] == pytest.approx(77 / 120)


@pytest.mark.skipif(not MINI_V2.exists(), reason="tests/data/squad-v2.0-mini.json not written yet")
def test_squad_scores_on_v2_mini_file():
    examples = _squad_file(MINI_V2)
    answers = {
        "sourdough-p1-q1": "lactic acid",  # [lactic, acid] vs [lactic, and, acetic, acids]: P 1/2, R 1/4 -> 1/3
        "sourdough-p1-q2": "six hours",  # 1, 1
        "sourdough-p1-q3": "",  # unanswerable: 1, 1
        "sourdough-p2-q1": "The California Gold Rush",  # 1, 1
        "sourdough-p2-q2": "1998",  # unanswerable, answered: 0, 0
    }
    # EM = 3/5, F1 = (1/3 + 3)/5 = 2/3; answerable (3): EM 2/3, F1 (1/3 + 2)/3 = 7/9; unanswerable (2): 1/2, 1/2
    s = squad_scores(examples, answers)
    assert s["exact_match"] == pytest.approx(3 / 5) and s["f1"] == pytest.approx(2 / 3)
    assert s["has_answer_examples"] == 3 and s["has_answer_exact_match"] == pytest.approx(2 / 3)
    assert s["has_answer_f1"] == pytest.approx(7 / 9)
    assert s["no_answer_examples"] == 2 and s["no_answer_f1"] == pytest.approx(0.5)


def test_find_best_threshold_by_hand():
    examples = [_ex("a", ["paris"]), _ex("b", []), _ex("c", ["rome"]), _ex("e", ["red barn door"]), _ex("d", [])]
    answers = {"a": "Paris", "b": "x", "c": "rome", "e": "barn", "d": ""}
    na = {"a": 0.1, "b": 0.2, "c": 0.3, "e": 0.35, "d": 0.4}
    # sweep by rising na_prob from "all null" (b, d right: 2): EM a +1 -> 3 (best, 0.1), b -1 -> 2, c +1 -> 3,
    # e +0 -> 3, d +0 -> 3: best 3/5 at 0.1.  F1: a 3 (0.1), b 2, c 3, e +0.5 -> 3.5 (best, 0.35), d 3.5: 3.5/5
    best = find_best_threshold(examples, answers, na)
    assert best["best_exact_match"] == pytest.approx(0.6) and best["best_exact_match_threshold"] == 0.1
    assert best["best_f1"] == pytest.approx(0.7) and best["best_f1_threshold"] == 0.35
    # the threshold reproduces the score: na_prob > 0.35 answers "" (only d)
    applied = {k: ("" if na[k] > 0.35 else v) for k, v in answers.items()}
    assert squad_scores(examples, applied)["f1"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="lack one"):
        find_best_threshold(examples, answers, {"a": 0.1})


# ------------------------------------------------------------------------------------------------ decoding

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel".split()
CONTEXT = " ".join(WORDS)
SPANS = [(m.start(), m.end()) for m in re.finditer(r"\S+", CONTEXT)]
Q, LOW, FILL = 3, -100.0, -50.0  # question tokens; logit of unmarked context tokens; of question/special tokens


def _window(example: int, first: int, last: int, starts: dict, ends: dict, cls: tuple = (0.0, 0.0),
            spans=SPANS, q: int = Q):
    """[CLS] q*Q [SEP] words[first..last] [SEP] with the given logits per word index (others LOW, the question and
    special tokens FILL, [CLS] `cls`). Returns (feature, start logits, end logits)."""
    words = list(range(first, last + 1))
    offsets = [None] * (q + 2) + [spans[w] for w in words] + [None]
    s = [cls[0]] + [FILL] * (q + 1) + [starts.get(w, LOW) for w in words] + [FILL]
    e = [cls[1]] + [FILL] * (q + 1) + [ends.get(w, LOW) for w in words] + [FILL]
    feature = QAFeature(example=example, input_ids=list(range(len(offsets))), token_type_ids=None, offsets=offsets,
                        start=0, end=0, cls_index=0)
    return feature, torch.tensor(s, dtype=torch.float64), torch.tensor(e, dtype=torch.float64)


def _decode(example, windows, **kw):
    feats, s, e = zip(*windows)
    return decode_answers([example], list(feats), list(s), list(e), **kw)[0]


def test_best_span_across_overlapping_windows_and_n_best_order():
    ex = _ex("x", ["golf hotel"], CONTEXT)
    # window A: words 0-5; start bravo 3, echo 1; end charlie 3, echo 2 -> bravo..charlie 6, bravo..echo 5, echo 3
    a = _window(0, 0, 5, {1: 3.0, 4: 1.0}, {2: 3.0, 4: 2.0}, cls=(0.5, 0.5))
    # window B: words 3-7; start echo 3, golf 4; end echo 3, hotel 4 -> golf..hotel 8, echo..hotel 7, echo 6
    b = _window(0, 3, 7, {4: 3.0, 6: 4.0}, {4: 3.0, 7: 4.0}, cls=(0.25, 0.25))
    d = _decode(ex, [a, b], n_best=6)
    assert d["id"] == "x" and d["answer"] == "golf hotel" and d["score"] == 8.0
    assert CONTEXT[d["start_char"]:d["end_char"]] == "golf hotel"
    assert d["null_score"] == 0.5  # min(0.5 + 0.5, 0.25 + 0.25)
    # pool: 8 B, 7 B, 6 A (window order breaks the tie), 6 B "echo", 5 A, 3 A "echo" (same text: kept once at 6)
    assert [(n["text"], n["score"]) for n in d["n_best"]] == [
        ("golf hotel", 8.0), ("echo foxtrot golf hotel", 7.0), ("bravo charlie", 6.0), ("echo", 6.0),
        ("bravo charlie delta echo", 5.0)]
    assert [n["text"] for n in _decode(ex, [a, b], n_best=2)["n_best"]] == ["golf hotel", "echo foxtrot golf hotel"]
    # the same logits as one padded (F, T) tensor
    padded = [torch.cat([t, torch.full((12 - len(t),), LOW, dtype=torch.float64)]) for t in (a[1], b[1], a[2], b[2])]
    d2 = decode_answers([ex], [a[0], b[0]], torch.stack(padded[:2]), torch.stack(padded[2:]), n_best=6)[0]
    assert d2 == d


def test_max_answer_length_is_respected():
    ex = _ex("x", [], CONTEXT)
    # start alpha 10, charlie 1; end foxtrot 9, delta 1.5 (every other context token LOW = -100)
    w = _window(0, 0, 7, {0: 10.0, 2: 1.0}, {5: 9.0, 3: 1.5})
    d = _decode(ex, [w], max_answer_length=6)  # alpha..foxtrot: 6 tokens, 19
    assert d["answer"] == "alpha bravo charlie delta echo foxtrot" and d["score"] == 19.0
    d = _decode(ex, [w], max_answer_length=5)  # alpha..delta (4 tokens) 11.5 beats charlie..foxtrot (4) 10
    assert d["answer"] == "alpha bravo charlie delta" and d["score"] == 11.5
    d = _decode(ex, [w], max_answer_length=2)  # charlie..delta 2.5
    assert d["answer"] == "charlie delta" and d["score"] == 2.5
    d = _decode(ex, [w], max_answer_length=1)  # alpha 10 - 100 beats foxtrot -100 + 9, delta, charlie
    assert d["answer"] == "alpha" and d["score"] == -90.0


def test_spans_never_cover_question_or_special_tokens():
    ex = _ex("x", [], CONTEXT)
    feature, s, e = _window(0, 0, 3, {1: 1.0}, {2: 1.0}, cls=(90.0, 90.0))
    s[1], e[3] = 100.0, 100.0  # question tokens
    s[4], e[4] = 95.0, 95.0  # [SEP] after the question
    e[-1] = 99.0  # the final [SEP]
    d = decode_answers([ex], [feature], [s], [e])[0]
    assert d["answer"] == "bravo charlie" and d["score"] == 2.0
    assert all(set(n["text"].split()) <= set(WORDS) for n in d["n_best"])
    assert d["null_score"] == 180.0  # the [CLS] span is the null answer, never a text span (v1.1: still answers)


def test_no_valid_span_and_no_window():
    examples = [_ex("x", [], CONTEXT), _ex("y", [], CONTEXT)]
    # n_best 1: the only start (hotel) is after the only end (alpha): no valid pair
    f, s, e = _window(0, 0, 7, {7: 5.0}, {0: 4.0}, cls=(-1.0, -1.0))
    d, none = decode_answers(examples, [f], [s], [e], n_best=1)
    assert d["answer"] == "" and d["score"] == -math.inf and d["n_best"] == [] and d["null_score"] == -2.0
    assert (d["start_char"], d["end_char"]) == (0, 0)
    assert none["answer"] == "" and none["null_score"] == math.inf and none["n_best"] == []
    # with every token a candidate: hotel..hotel 5 + LOW = -95 beats alpha..alpha LOW + 4 = -96
    d = decode_answers(examples, [f], [s], [e], n_best=20)[0]
    assert d["answer"] == "hotel" and d["score"] == -95.0
    with pytest.raises(ValueError, match="one start and one end"):
        decode_answers(examples, [f], [s], [])
    with pytest.raises(ValueError, match="at least 14 logits"):
        decode_answers(examples, [f], [s[:5]], [e])


def test_v2_null_threshold_flips_exactly_at_the_difference():
    ex = _ex("x", [], CONTEXT)
    # best span charlie..delta: 3.25 + 2.25 = 5.5; null = 1.5 + 1.25 = 2.75; null - score = -2.75
    w = _window(0, 0, 7, {2: 3.25}, {3: 2.25}, cls=(1.5, 1.25))
    assert _decode(ex, [w])["answer"] == "charlie delta"  # None: v1.1, never ""
    assert _decode(ex, [w], null_threshold=-2.75)["answer"] == "charlie delta"  # not strictly greater
    flipped = _decode(ex, [w], null_threshold=-2.75 - 2 ** -20)
    assert flipped["answer"] == "" and flipped["score"] == 5.5 and flipped["null_score"] == 2.75
    assert flipped["n_best"][0]["text"] == "charlie delta"
    # null above the span: null 6 (cls 3 + 3), span 4 -> difference 2
    w = _window(0, 0, 7, {2: 2.0}, {3: 2.0}, cls=(3.0, 3.0))
    assert _decode(ex, [w], null_threshold=2.0)["answer"] == "charlie delta"
    assert _decode(ex, [w], null_threshold=1.999)["answer"] == ""
    assert _decode(ex, [w], null_threshold=0.0)["answer"] == ""
    answers, na = threshold_inputs([_decode(ex, [w], null_threshold=0.0)])
    assert answers == {"x": "charlie delta"} and na == {"x": 2.0}


def _reference(example, windows, n_best, max_len, threshold):
    """Brute force over all (start, end) token pairs of every window: a pair counts when both tokens are among the
    window's n_best highest start / end logits, both are context tokens, and 1 <= length <= max_len."""
    pool = []
    for f, s, e in windows:
        s, e, t = s.tolist(), e.tolist(), len(f.offsets)
        top_s = set(sorted(range(t), key=lambda i: -s[i])[:n_best])
        top_e = set(sorted(range(t), key=lambda i: -e[i])[:n_best])
        for a in range(t):
            for b in range(t):
                if (a in top_s and b in top_e and f.offsets[a] is not None and f.offsets[b] is not None
                        and a <= b < a + max_len):
                    lo, hi = f.offsets[a][0], f.offsets[b][1]
                    pool.append((s[a] + e[b], example.context[lo:hi], lo, hi))
    pool.sort(key=lambda c: -c[0])
    listed, seen = [], set()
    for score, text, _, _ in pool:
        if text not in seen and len(listed) < n_best:
            seen.add(text)
            listed.append((text, score))
    null = min(float(s[f.cls_index]) + float(e[f.cls_index]) for f, s, e in windows)
    best = pool[0] if pool else (-math.inf, "", 0, 0)
    answer = best[1] if threshold is None or null - best[0] <= threshold else ""
    return answer, best[0], null, listed


def test_decode_equals_brute_force_reference_on_random_logits():
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    for trial in range(12):
        words = [f"w{i}" for i in range(rng.randint(5, 40))]
        context = " ".join(words)
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)]
        examples, features, starts, ends, per_example = [], [], [], [], []
        for k in range(3):
            examples.append(_ex(f"t{trial}e{k}", [], context))
            width, stride = rng.randint(4, 12), rng.randint(1, 3)  # stride < width: windows advance
            first, mine = 0, []
            while True:  # overlapping windows over the words
                last = min(len(words) - 1, first + width - 1)
                f, _, _ = _window(k, first, last, {}, {}, spans=spans, q=rng.randint(1, 4))
                s = torch.randn(len(f.offsets), generator=gen, dtype=torch.float32)  # (T_i,)
                e = torch.randn(len(f.offsets), generator=gen, dtype=torch.float32)  # (T_i,)
                features.append(f)
                starts.append(s)
                ends.append(e)
                mine.append((f, s, e))
                if last == len(words) - 1:
                    break
                first = last + 1 - stride
            per_example.append(mine)
        n_best, max_len = rng.choice([1, 3, 5, 20, 500]), rng.choice([1, 2, 4, 30])
        threshold = rng.choice([None, -1.0, 0.0, 0.5])
        decoded = decode_answers(examples, features, starts, ends, n_best=n_best, max_answer_length=max_len,
                                 null_threshold=threshold)
        for ex, d, mine in zip(examples, decoded, per_example):
            answer, score, null, listed = _reference(ex, mine, n_best, max_len, threshold)
            assert d["answer"] == answer and d["score"] == pytest.approx(score)
            assert d["null_score"] == pytest.approx(null)
            assert [n["text"] for n in d["n_best"]] == [t for t, _ in listed]
            assert [n["score"] for n in d["n_best"]] == pytest.approx([sc for _, sc in listed])
            assert ex.context[d["start_char"]:d["end_char"]] == d["answer"]


# ------------------------------------------------------------------------------------------------ report, baseline

def test_qa_report_errors_reasons_and_kinds():
    examples, answers = _seven()
    kinds = {"q1": "who", "q2": "where", "q3": "when", "q6": "when"}
    r = qa_report(examples, answers, kinds=kinds, show=3)
    assert r["exact_match"] == pytest.approx(2 / 7) and r["wrong"] == 5
    assert r["error_reasons"] == {"empty_prediction": 1, "answered_unanswerable": 1, "partial_overlap": 1,
                                  "no_overlap": 1, "missing_prediction": 1}
    # F1 0: q3, q4, q6, q7 (by id), then q2 (4/7); show 3
    assert [e["id"] for e in r["errors"]] == ["q3", "q4", "q6"]
    assert r["errors"][0] == {"id": "q3", "question": "q?", "gold": ["1966"], "predicted": "1967", "f1": 0.0}
    assert r["errors"][2]["gold"] == []
    assert set(r["per_kind"]) == {"who", "where", "when", "other"}
    assert r["per_kind"]["who"]["exact_match"] == 1.0
    assert r["per_kind"]["where"]["f1"] == pytest.approx(4 / 7)
    assert r["per_kind"]["when"]["no_answer_examples"] == 1 and r["per_kind"]["when"]["f1"] == 0.0
    assert r["per_kind"]["other"]["examples"] == 3 and r["per_kind"]["other"]["exact_match"] == pytest.approx(1 / 3)
    text = format_qa_report(r)
    assert "EM  28.57" in text and "F1  36.73" in text  # 2/7, 18/49
    assert "wrong (F1 < 1): 5" in text and "answered unanswerable 1" in text
    # decode_answers' output is accepted too
    decoded = [{"id": k, "answer": v} for k, v in answers.items()]
    assert qa_report(examples, decoded)["f1"] == pytest.approx(18 / 49)


def test_lexical_baseline_picks_the_sentence_with_most_shared_words():
    context = ("The tower was built in 1889. It is located in Paris!  Gustave Eiffel's company designed the "
               "tower.\nVisitors climb it.")
    # question words {which, company, designed, tower}: sentence 1 shares 1 (tower), 2 shares 0, 3 shares 3
    ex = QAExample(id="b", question="Which company designed the tower?", context=context, answers=[], where="t")
    assert lexical_baseline(ex) == "Gustave Eiffel's company designed the tower."
    # {when, was, it}: sentence 1 shares "was", sentence 2 and 4 share "it": a tie goes to the first
    ex = QAExample(id="c", question="When was it?", context=context, answers=[], where="t")
    assert lexical_baseline(ex) == "The tower was built in 1889."
    ex = QAExample(id="d", question="Who visits?", context="", answers=[], where="t")
    assert lexical_baseline(ex) == ""


def test_punctuation_only_answers_follow_each_official_script():
    """The one place evaluate-v1.1.py and evaluate-v2.0.py disagree: a gold answer that normalises to "" (here a
    default value written as ','). v1.1 keeps it: the prediction ',' normalises to the same "" (EM 1) but shares no
    token (F1 0, its `num_same == 0` branch). v2.0 drops it, reads the question as "no answer" and gives an empty
    prediction EM 1 and F1 1. A data set is scored by v1.1's rules unless it has unanswerable questions."""
    assert exact_match(",", ["','"], "1.1") == 1.0 and f1(",", ["','"], "1.1") == 0.0
    assert exact_match(",", ["','"], "2.0") == 1.0 and f1(",", ["','"], "2.0") == 1.0
    # with a second, wordy gold the v2.0 rules score against it alone; v1.1 still takes the max over both
    assert f1("comma", ["','", "a comma"], "1.1") == 1.0 and exact_match("", ["','", "comma"], "1.1") == 1.0
    assert exact_match("", ["','", "comma"], "2.0") == 0.0
    ex = [_ex("p", ["','"]), _ex("q", ["the comma"])]
    v1 = squad_scores(ex, {"p": ",", "q": "comma"})
    assert v1["rules"] == "squad-v1.1" and v1["exact_match"] == 1.0 and v1["f1"] == pytest.approx(0.5)
    v2 = squad_scores(ex + [_ex("r", [])], {"p": ",", "q": "comma", "r": ""})
    assert v2["rules"] == "squad-v2.0" and v2["f1"] == 1.0
    with pytest.raises(ValueError, match="version"):
        f1("x", ["x"], "3.0")
