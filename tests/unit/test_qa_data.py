"""Extractive-QA data: the SQuAD fixtures (hand-written, answer_starts checked by hand), record layouts, bad-data
errors naming file:line or the JSON path, sliding windows on real tokenizers (MiniLM WordPiece, SmolLM2 byte-level
BPE: coverage, exact doc_stride overlap, gold positions whose offsets slice back to the answer), collate, and the
stable by-context validation split."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.data.qa import QACollate, QAData, QAExample, QAStats, load_qa_data, qa_features, read_qa
from lmforge.data.readers import DataError
from lmforge.splits import in_fraction

DATA = Path(__file__).resolve().parents[1] / "data"
V1, V2 = DATA / "squad-v1.1-mini.json", DATA / "squad-v2.0-mini.json"


@pytest.fixture(scope="module")
def minilm():
    from lmforge.models.loading import load_tokenizer

    return load_tokenizer("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def smollm2_tok():
    from lmforge.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(params=["minilm", "smollm2_tok"])
def tok(request):
    return request.getfixturevalue(request.param)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _squad(path: Path, top) -> Path:
    path.write_text(json.dumps(top), encoding="utf-8")
    return path


# ---- reading the fixtures


def test_read_squad_v11_fixture():
    examples, stats = read_qa(V1)
    assert (stats.records, stats.examples, stats.unanswerable) == (8, 8, 0)
    assert [e.id for e in examples] == ["json-p1-q1", "json-p1-q2", "json-p1-q3", "json-p1-q4", "json-p2-q1",
                                        "json-p2-q2", "bruges-p1-q1", "bruges-p1-q2"]
    by_id = {e.id: e for e in examples}
    # offsets counted by hand in the fixture's contexts
    assert by_id["json-p1-q3"].answers == [("2008", 425), ("in 2008", 422), ("2008", 425)]
    assert by_id["json-p1-q4"].answers == [("the third-party simplejson package", 444), ("simplejson", 460),
                                           ("third-party simplejson package", 448)]
    assert by_id["bruges-p1-q1"].answers == [("the Zwin", 162), ("Zwin", 166), ("a tidal inlet called the Zwin", 141)]
    assert by_id["json-p2-q1"].where == f"{V1}: data[0].paragraphs[1].qas[0]"
    assert by_id["bruges-p1-q2"].where == f"{V1}: data[1].paragraphs[0].qas[1]"
    assert by_id["bruges-p1-q2"].context.startswith("Bruges, the capital")
    assert len({e.context for e in examples}) == 3


def test_read_squad_v20_fixture():
    examples, stats = read_qa(V2)
    assert (stats.records, stats.examples, stats.unanswerable) == (5, 5, 2)
    assert [e.id for e in examples if not e.answers] == ["sourdough-p1-q3", "sourdough-p2-q2"]  # plausible ignored
    assert examples[3].answers == [("the California Gold Rush of 1849", 163), ("California Gold Rush", 167)]
    assert examples[4].where == f"{V2}: data[0].paragraphs[1].qas[1]"
    both, stats = read_qa([V1, V2])
    assert len(both) == 13 and stats.unanswerable == 2


def _records(hf_layout: bool, with_ids: bool = True) -> list[dict]:
    out = []
    for ex in read_qa([V1, V2])[0]:
        if hf_layout:
            answers = {"text": [t for t, _ in ex.answers], "answer_start": [s for _, s in ex.answers]}
        else:
            answers = [{"text": t, "answer_start": s} for t, s in ex.answers]
        rec = {"context": ex.context, "question": ex.question, "answers": answers}
        out.append({"id": ex.id, **rec} if with_ids else rec)
    return out


def test_record_layouts_give_the_same_examples(tmp_path):
    squad, _ = read_qa([V1, V2])
    hf, stats = read_qa(_jsonl(tmp_path / "hf.jsonl", _records(True)))
    listed, _ = read_qa(_jsonl(tmp_path / "list.jsonl", _records(False)))
    key = [(e.id, e.question, e.context, e.answers) for e in squad]
    assert [(e.id, e.question, e.context, e.answers) for e in hf] == key
    assert [(e.id, e.question, e.context, e.answers) for e in listed] == key
    assert hf[2].where == f"{tmp_path / 'hf.jsonl'}:3" and stats.unanswerable == 2
    anon, _ = read_qa(_jsonl(tmp_path / "anon.jsonl", _records(True, with_ids=False)))
    assert [e.id for e in anon[:2]] == ["anon:1", "anon:2"]  # "<file stem>:<line>"
    with open(tmp_path / "c.csv", "w", newline="", encoding="utf-8") as f:  # CSV: answers as a JSON cell
        w = csv.writer(f)
        w.writerow(["id", "context", "question", "answers"])
        w.writerows([r["id"], r["context"], r["question"], json.dumps(r["answers"])] for r in _records(True))
    assert [(e.id, e.answers) for e in read_qa(tmp_path / "c.csv")[0]] == [(e.id, e.answers) for e in squad]


def test_parquet_in_the_hf_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_records(True)), tmp_path / "squad.parquet")
    examples, stats = read_qa(tmp_path / "squad.parquet")
    assert [(e.id, e.answers) for e in examples] == [(e.id, e.answers) for e in read_qa([V1, V2])[0]]
    assert stats.unanswerable == 2 and examples[0].where == f"{tmp_path / 'squad.parquet'}:row 1"


# ---- bad data: one line naming the file and line or JSON path


CTX = "Bruges lies in West Flanders."


def _bad_record(**kw) -> dict:
    rec = {"id": "x", "context": CTX, "question": "Where is Bruges?",
           "answers": {"text": ["West Flanders"], "answer_start": [15]}}
    rec.update(kw)
    return {k: v for k, v in rec.items() if v is not ...}


@pytest.mark.parametrize("record, message", [
    (_bad_record(answers={"text": ["West Flanders"], "answer_start": [14]}),
     ("answers[0]: answer 'West Flanders' is not at answer_start 14 of the context (found ' West Flander'); "
      "expected the answer text to start there")),
    (_bad_record(answers={"text": ["West"], "answer_start": ["15"]}), "answer_start is str '15'; expected an integer"),
    (_bad_record(answers={"text": ["West"], "answer_start": [29]}), "answer_start 29 is out of range"),
    (_bad_record(answers={"text": ["West"], "answer_start": [-1]}), "answer_start -1 is out of range"),
    (_bad_record(answers={"text": ["West", "Flanders"], "answer_start": [15]}),
     "answers has 2 texts and 1 answer_starts"),
    (_bad_record(answers=[{"text": "West"}]), "answers[0] has keys 'text'; expected an object with 'text' and"),
    (_bad_record(answers=...), "no 'answers' field (found keys 'id', 'context', 'question')"),
    (_bad_record(question="  "), "'question' is empty"),
    (_bad_record(context=""), "'context' is empty"),
    (_bad_record(context=...), "no 'context' field"),
])
def test_bad_records_name_file_and_line(tmp_path, record, message):
    path = _jsonl(tmp_path / "qa.jsonl", [_bad_record(id="ok"), record])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
        read_qa(path)


def test_empty_answers_are_unanswerable_and_duplicates_name_both_places(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [_bad_record(id="a", answers={"text": [], "answer_start": []}),
                                          _bad_record(id="b", answers=[])])
    examples, stats = read_qa(path)
    assert [e.answers for e in examples] == [[], []] and stats.unanswerable == 2
    dup = _jsonl(tmp_path / "dup.jsonl", [_bad_record(id="a"), _bad_record(id="b"), _bad_record(id="a")])
    with pytest.raises(DataError, match=re.escape(f"{dup}:3: duplicate id 'a' (first at {dup}:1)")):
        read_qa(dup)
    squad = _squad(tmp_path / "dup.json", {"data": [{"paragraphs": [_para()]}, {"paragraphs": [_para(), _para()]}]})
    with pytest.raises(DataError, match=re.escape(f"{squad}: data[1].paragraphs[0].qas[0]: duplicate id 'q1' (first at "
                                                  f"{squad}: data[0].paragraphs[0].qas[0])")):
        read_qa(squad)


def _para(**qa) -> dict:
    item = {"id": "q1", "question": "Where is Bruges?", "answers": [{"text": "West Flanders", "answer_start": 15}]}
    item.update(qa)
    return {"context": CTX, "qas": [{k: v for k, v in item.items() if v is not ...}]}


@pytest.mark.parametrize("top, message", [
    ({"version": "1.1", "articles": []}, "top level: no 'data' list (found keys 'version', 'articles')"),
    ([1, 2], "top level: no 'data' list (found a list)"),
    ({"data": [{"title": "B", "paras": []}]}, "data[0]: no 'paragraphs' list (found keys 'title', 'paras')"),
    ({"data": [{"paragraphs": [{"context": CTX}]}]}, "data[0].paragraphs[0]: no 'qas' list (found keys 'context')"),
    ({"data": [{"paragraphs": [{"qas": []}]}]}, "data[0].paragraphs[0]: no 'context' field"),
    ({"data": [{"paragraphs": [_para(answers=...)]}]}, "data[0].paragraphs[0].qas[0]: no 'answers' list"),
    ({"data": [{"paragraphs": [_para(question="")]}]}, "data[0].paragraphs[0].qas[0]: 'question' is empty"),
    ({"data": [{"paragraphs": [_para(answers=[{"text": "Flanders", "answer_start": 15}])]}]},
     ("data[0].paragraphs[0].qas[0]: answers[0]: answer 'Flanders' is not at answer_start 15 of the context "
      "(found 'West Fla')")),
    ({"data": [{"paragraphs": [_para(is_impossible=True)]}]}, 
     "data[0].paragraphs[0].qas[0]: is_impossible is true but 1 answers"),
])
def test_bad_squad_json_names_the_json_path(tmp_path, top, message):
    path = _squad(tmp_path / "s.json", top)
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        read_qa(path)


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"data": [\n  {"paragraphs": ]\n}', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: malformed JSON")):
        read_qa(path)


# ---- windows


def _long_context() -> tuple[str, list[tuple[str, int]]]:
    """A real text (the json module's docstring, ~2.8k characters) and answers at known places: every 5th whole
    word (whitespace before it, whitespace or punctuation after), some 2-3 word spans and one ~600-character span."""
    import json as json_module

    text = json_module.__doc__
    words = [m for m in re.finditer(r"[A-Za-z]+", text)
             if (m.start() == 0 or text[m.start() - 1].isspace())
             and (m.end() == len(text) or text[m.end()].isspace() or text[m.end()] in ".,;:)")]
    answers = [(m.group(), m.start()) for m in words[::5]]
    for i in range(len(words) - 2):  # 2-3 word spans of words one space apart
        a, b = words[i], words[i + 1 + i % 2]
        span = text[a.start():b.end()]
        if i % 4 == 0 and re.fullmatch(r"[A-Za-z]+( [A-Za-z]+){1,2}", span):
            answers.append((span, a.start()))
    a = words[20]
    b = next(w for w in words if w.end() > a.start() + 600)
    answers.append((text[a.start():b.end()], a.start()))
    return text, answers


def _windows_of(features, n):
    return [f for f in features if f.example == n]


@pytest.mark.parametrize("max_length, doc_stride", [(64, 16), (96, 0), (128, 40), (384, 128)])
def test_windows_cover_overlap_and_hold_the_gold(tok, max_length, doc_stride):
    context, answers = _long_context()
    examples = [QAExample(f"a{i}", "Which word is at this place?", context, [ans], f"t:{i}")
                for i, ans in enumerate(answers)]
    examples.append(QAExample("none", "Is anything here?", context, [], "t:none"))
    stats = QAStats()
    features = qa_features(examples, tok, max_length, doc_stride, max_question_length=16, stats=stats)
    full = tok.backend.encode(context, add_special_tokens=False).ids
    encoder = tok.cls_token is not None
    outside = 0
    for n, ex in enumerate(examples):
        wins = _windows_of(features, n)
        q = tok.backend.encode(ex.question, add_special_tokens=False).ids
        assert len(wins) > 1 or max_length == 384
        seen: list[tuple[int, tuple[int, int]]] = []
        fits_somewhere = False
        for k, f in enumerate(wins):
            assert len(f.input_ids) <= max_length and len(f.offsets) == len(f.input_ids)
            if k < len(wins) - 1:
                assert len(f.input_ids) == max_length
            ctx = [(i, o) for i, o in zip(f.input_ids, f.offsets) if o is not None]
            first = next(j for j, o in enumerate(f.offsets) if o is not None)
            assert [o is not None for o in f.offsets] == [first <= j < first + len(ctx) for j in range(len(f.offsets))]
            if encoder:  # [CLS] q [SEP] window [SEP], type ids 0 / 1
                assert f.input_ids[:len(q) + 2] == [tok.token_id("[CLS]"), *q, tok.token_id("[SEP]")]
                assert f.token_type_ids == [0] * (len(q) + 2) + [1] * (len(ctx) + 1)
            else:  # q <eos> window <eos>
                assert f.input_ids == [*q, tok.eos_id, *(i for i, _ in ctx), tok.eos_id]
                assert f.token_type_ids is None
            if k == 0:
                seen = ctx
            else:  # exactly doc_stride context tokens shared with the previous window
                assert ctx[:doc_stride] == seen[len(seen) - doc_stride:]
                seen += ctx[doc_stride:]
            assert f.cls_index == 0
            if not ex.answers:
                assert f.start == f.end == 0
                continue
            text, a = ex.answers[0]
            fits = ctx[0][1][0] <= a and a + len(text) <= ctx[-1][1][1]
            fits_somewhere |= fits
            if fits:
                assert first <= f.start <= f.end < first + len(ctx)
                assert context[f.offsets[f.start][0]:f.offsets[f.end][1]] == text
            else:
                assert f.start == f.end == 0
        assert [i for i, _ in seen] == full  # every context token is in a window, in order
        if ex.answers and not fits_somewhere:
            outside += 1
            # with doc_stride 0 a short answer can straddle two windows; else only the long span fits nowhere
            assert len(ex.answers[0][0]) > 500 or doc_stride == 0, ex.answers[0]
        if ex.answers and len(ex.answers[0][0]) > 500:
            assert fits_somewhere == (max_length == 384)
    assert stats.answers_outside == outside and (outside == 1 or max_length == 384)
    assert stats.windows == len(features) and stats.questions_cut == 0


def test_pair_framing_matches_the_tokenizer(tok):
    examples, _ = read_qa(V1)
    for f in qa_features(examples, tok, max_length=384, doc_stride=128):  # one window per short context
        ex = examples[f.example]
        q = tok.backend.encode(ex.question, add_special_tokens=False)
        c = tok.backend.encode(ex.context, add_special_tokens=False)
        if tok.cls_token is not None:
            ref = tok.backend.post_process(q, c, add_special_tokens=True)
            assert (f.input_ids, f.token_type_ids) == (ref.ids, ref.type_ids)
        else:
            assert f.input_ids == q.ids + [tok.eos_id] + c.ids + [tok.eos_id]
        assert ex.context[f.offsets[f.start][0]:f.offsets[f.end][1]] == ex.answers[0][0]


def test_byte_level_offsets_slice_exact_words(smollm2_tok, minilm):
    context = "The json module, in Python 3.12,  encodes café objects; “quoted” text\tand 日本語 here."
    words = ["json module", "Python", "3.12", "café", "quoted", "text", "日本語", "here"]
    examples = [QAExample(w, "What?", context, [(w, context.index(w))], "t") for w in words]
    for tok in (smollm2_tok, minilm):
        features = qa_features(examples, tok, max_length=64, doc_stride=8)
        assert len(features) == len(words)
        assert [context[f.offsets[f.start][0]:f.offsets[f.end][1]] for f in features] == words


def test_long_questions_are_cut_and_counted(minilm):
    question = "Which " + " ".join(["very"] * 40) + " long question is this?"
    ex = QAExample("q", question, "Bruges lies in West Flanders.", [("West Flanders", 15)], "t")
    stats = QAStats()
    (f,) = qa_features([ex, ex], minilm, max_length=64, doc_stride=8, max_question_length=16, stats=stats)[:1]
    assert stats.questions_cut == 2
    assert f.input_ids.index(minilm.token_id("[SEP]")) == 17  # [CLS] + 16 question tokens
    assert f.token_type_ids.count(0) == 18 and f.offsets[f.start][0] == 15 and f.offsets[f.end][1] == 28


def test_qa_data_validate():
    QAData().validate()
    for cfg, field in [(QAData(max_length=64, max_question_length=60), "max_length"),
                       (QAData(max_length=64, max_question_length=16, doc_stride=45), "doc_stride"),
                       (QAData(doc_stride=-1), "doc_stride"), (QAData(max_question_length=0), "max_question_length")]:
        with pytest.raises(ValueError, match=f"^{field}: "):
            cfg.validate()
    QAData(max_length=64, max_question_length=16, doc_stride=44).validate()
    assert QAData(n_best=5, null_threshold=0.0).decoding() == {"n_best": 5, "max_answer_length": 30,
                                                              "null_threshold": 0.0}
    with pytest.raises(ValueError, match="^n_best: "):
        QAData(n_best=0).validate()


def test_stride_too_large_only_matters_to_long_contexts(minilm):
    short = QAExample("s", "Where?", "Bruges lies in West Flanders.", [("West Flanders", 15)], "t")
    (f,) = qa_features([short], minilm, max_length=32, doc_stride=128)  # one window: the stride is never used
    assert short.context[f.offsets[f.start][0]:f.offsets[f.end][1]] == "West Flanders"
    long = QAExample("l", "Where?", " ".join(["Bruges lies in West Flanders."] * 20), [], "t")
    with pytest.raises(ValueError, match="expected more than doc_stride 128"):
        qa_features([long], minilm, max_length=32, doc_stride=128)


# ---- batches


def test_collate_pads_and_masks(tok):
    examples, _ = read_qa(V2)
    features = qa_features(examples, tok, max_length=48, doc_stride=8)
    batch = QACollate(tok.padding_id)(features)
    lengths = [len(f.input_ids) for f in features]
    b, t = len(features), max(lengths)
    assert min(lengths) < t and batch["input_ids"].shape == batch["attention_mask"].shape == (b, t)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, f in enumerate(features):
        assert batch["input_ids"][i, :lengths[i]].tolist() == f.input_ids
        assert (batch["input_ids"][i, lengths[i]:] == tok.padding_id).all()
    assert batch["start_positions"].dtype == batch["end_positions"].dtype == torch.long
    assert batch["start_positions"].tolist() == [f.start for f in features]
    assert batch["end_positions"].tolist() == [f.end for f in features]
    assert sum(s > 0 for s in batch["start_positions"].tolist()) >= 3  # the 3 answerable questions
    if tok.cls_token is not None:
        assert batch["token_type_ids"].shape == (b, t)
        assert batch["token_type_ids"][0, :lengths[0]].tolist() == features[0].token_type_ids
    else:
        assert "token_type_ids" not in batch


# ---- the finetune data section


def _section(train, validation=(), fraction=0.05, **qa) -> SimpleNamespace:
    return SimpleNamespace(train=list(map(str, train)), validation=list(map(str, validation)),
                           validation_fraction=fraction, qa=QAData(**qa))


def test_load_qa_data_with_validation_files(minilm):
    d = _section([V1], [V2], max_length=64, doc_stride=16, max_question_length=24)
    train_f, val, val_f, collate, summary = load_qa_data(d, minilm)
    assert [e.id for e in val] == [e.id for e in read_qa(V2)[0]]
    assert sorted({f.example for f in train_f}) == list(range(8))
    assert sorted({f.example for f in val_f}) == list(range(5))
    assert all(len(f.input_ids) <= 64 for f in train_f + val_f)
    assert isinstance(collate, QACollate) and collate.pad_id == minilm.padding_id
    assert summary.startswith("qa data: 13 records, 13 examples (2 unanswerable)")
    assert "8 train / 5 validation" in summary


def test_load_qa_data_splits_by_context(tmp_path, smollm2_tok):
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike".split()
    records = []
    for i, w in enumerate(words):
        context = f"Paragraph {i} is about {w}. It has a second sentence about {w} too."
        for j in range(3):
            records.append({"id": f"{w}-{j}", "context": context, "question": f"What is paragraph {i} about ({j})?",
                            "answers": {"text": [w], "answer_start": [context.index(w)]}})
    path = _jsonl(tmp_path / "a.jsonl", records)
    rev = _jsonl(tmp_path / "b.jsonl", records[::-1])
    d = _section([path], fraction=0.4, max_length=48, doc_stride=8, max_question_length=16)
    train_f, val, val_f, _, summary = load_qa_data(d, smollm2_tok, seed=3)
    expected = {r["id"] for r in records if in_fraction(r["context"], 0.4, 3)}
    assert 0 < len(expected) < len(records)
    assert {e.id for e in val} == expected
    assert {f.example for f in val_f} == set(range(len(val)))
    assert len({f.example for f in train_f}) == len(records) - len(val)
    assert f"{len(records) - len(val)} train / {len(val)} validation" in summary
    _, val_rev, _, _, _ = load_qa_data(_section([rev], fraction=0.4, max_length=48, doc_stride=8,
                                                max_question_length=16), smollm2_tok, seed=3)
    assert {e.id for e in val_rev} == expected  # independent of record order
    _, val_other, _, _, _ = load_qa_data(d, smollm2_tok, seed=4)
    assert {e.id for e in val_other} != expected or len(expected) == 0
    with pytest.raises(ValueError, match="max_length"):
        load_qa_data(_section([path], max_length=20, max_question_length=16), smollm2_tok)


@pytest.mark.parametrize("max_length, doc_stride", [(192, 48), (384, 128)])
def test_every_stdlib_qa_answer_round_trips_through_the_windows(minilm, smollm2_tok, max_length, doc_stride):
    """The whole stdlib QA set: every answer fits a window, and that window's token offsets slice exactly the
    answer back out of the context with MiniLM's WordPiece (100%). SmolLM2's byte-level BPE merges punctuation
    across an answer's edge ("='exec'," is one run of tokens), so there the slice is the shortest run of whole
    tokens around the answer: it contains the answer."""
    from lmforge.data.qa_data import qa_records

    examples = [QAExample(r["id"], r["question"], r["context"],
                          [(r["answers"]["text"][0], r["answers"]["answer_start"][0])], r["id"])
                for split in qa_records().values() for r in split]
    for tok, exact_needed in ((minilm, True), (smollm2_tok, False)):
        stats = QAStats()
        features = qa_features(examples, tok, max_length, doc_stride, stats=stats)
        found: dict[int, str] = {}
        for f in features:
            if f.start != f.cls_index:
                found.setdefault(f.example, examples[f.example].context[f.offsets[f.start][0]:f.offsets[f.end][1]])
        assert stats.answers_outside == 0 and len(found) == len(examples)
        exact = sum(found[i] == ex.answers[0][0] for i, ex in enumerate(examples))
        if exact_needed:
            assert exact == len(examples)
        else:
            assert exact >= 0.8 * len(examples)
            for i, ex in enumerate(examples):
                assert ex.answers[0][0] in found[i]  # the covering run of tokens holds the answer
