"""Extractive QA end to end: `lmforge finetune` with task qa (every method that applies) on questions about the
standard library, a tiny random BERT over MiniLM's real WordPiece vocabulary; the span model reloads, `lmforge
generate` answers JSON lines, `lmforge evaluate --tasks qa:PATH` scores a SQuAD file, and bad input stops with its
line. The real-model figures (MiniLM, F1 against random init and a lexical baseline) are in
benchmarks/finetune_qa.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine_fixtures import dump_config

import lmforge
from lmforge import cli
from lmforge.data.qa import QAData, read_qa
from lmforge.data.qa_data import qa_records
from lmforge.models import ModelConfig, Transformer
from lmforge.models.presets import PRESETS
from lmforge.objectives.span import answer_questions

SQUAD = Path(__file__).resolve().parents[1] / "data" / "squad-v1.1-mini.json"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """(train, validation) JSONL: 160 / 48 questions of the stdlib QA set's own splits."""
    root = tmp_path_factory.mktemp("qa-data")
    splits = qa_records()
    paths = []
    for name, n in (("train", 160), ("validation", 48)):
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in splits[name][:n]))
        paths.append(p)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def tiny_bert(minilm_dir, tmp_path_factory) -> Path:
    """bert-tiny (2 layers, width 64) over MiniLM's vocabulary with a random span head, saved with its tokenizer."""
    tok = lmforge.load_tokenizer(minilm_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(**dict(PRESETS["bert-tiny"], vocab_size=tok.vocab_size, head="span",
                             max_position_embeddings=256))
    return lmforge.save(Transformer(cfg).eval(), tok, tmp_path_factory.mktemp("bert") / "tiny-span")


def _finetune(tmp_path: Path, init: Path, data, method: str, **over) -> Path:
    run = tmp_path / method
    cfg = {"run_dir": str(run), "task": "qa", "method": method, "model": {"init_from": str(init)},
           "data": {"train": [str(data[0])], "validation": [str(data[1])], "qa": {"max_length": 128,
                                                                                   "doc_stride": 32}},
           "lora": {"rank": 4, "alpha": 8}, "adapter": {"bottleneck": 8}, "freeze": {"train_top": 1},
           "train": {"steps": 12, "micro_batch": 8, "log_every": 4, "eval_batches": None, "tensorboard": False,
                     "progress_bar": False, "precision": "fp32", "device": "cpu", "optimizer": {"lr": 3e-3},
                     "schedule": {"warmup_steps": 0}}}
    dump_config(cfg, tmp_path / f"{method}.yaml", **over)
    assert cli.main(["finetune", "--config", str(tmp_path / f"{method}.yaml")]) == 0
    return run


@pytest.mark.parametrize("method", ["full", "freeze", "lora", "adapter"])
def test_every_method_trains_the_span_head(tiny_bert, data, tmp_path, method):
    run = _finetune(tmp_path, tiny_bert, data, method)
    result = json.loads((run / "eval.json").read_text())
    assert result["before"]["val_loss"] > result["val_loss"]  # the span loss on held-out modules went down
    report = result["report"]
    assert report["examples"] == 48 and 0 <= report["exact_match"] <= report["f1"] <= 1 and report["errors"]
    model, tok = lmforge.load(run / "final")
    base, _ = lmforge.load(tiny_bert)
    assert model.cfg.head == "span"
    trained = model.state_dict()
    changed = {n for n, p in base.state_dict().items() if not torch.equal(p, trained[n])}
    assert {"qa_outputs.weight", "qa_outputs.bias"} <= changed  # the new head always trains
    if method in ("freeze", "adapter"):  # the frozen embeddings stay as they were
        assert not any(n.startswith("embed.") for n in changed)
    if method == "lora":  # the PEFT adapter (task QUESTION_ANS, qa_outputs saved in full) on the base = final/
        adapted, _ = lmforge.load(run / "adapter")
        assert adapted.cfg.head == "span"
        ids = torch.tensor([tok.encode("What is it? It is a test.")])
        torch.testing.assert_close(adapted(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    # the final report is the saved model's own answers to the validation questions
    examples, _ = read_qa(data[1])
    answers = answer_questions(model, tok, examples, QAData(max_length=128, doc_stride=32))
    wrong = {e["id"]: e["predicted"] for e in report["errors"]}
    for a in answers:
        if a["id"] in wrong:
            assert wrong[a["id"]] == a["answer"]


def test_squad_v2_training_learns_unanswerable_questions(tiny_bert, tmp_path):
    """SQuAD v2.0 data (unanswerable questions point at [CLS] in every window) trains, and the report splits the
    scores into answerable and unanswerable groups, with the null threshold applied."""
    v2 = SQUAD.with_name("squad-v2.0-mini.json")
    run = _finetune(tmp_path, tiny_bert, (v2, v2), "full", **{"data.qa.null_threshold": 0.0, "train.steps": 4})
    report = json.loads((run / "eval.json").read_text())["report"]
    examples, _ = read_qa(v2)
    assert report["no_answer_examples"] == sum(not e.answers for e in examples) > 0
    assert report["has_answer_examples"] == sum(bool(e.answers) for e in examples)


def test_generate_and_evaluate_answer_with_the_span_model(tiny_bert, tmp_path, capsys, monkeypatch):
    import io

    model, tok = lmforge.load(tiny_bert)
    examples, _ = read_qa(SQUAD)
    lines = "\n".join(json.dumps({"question": e.question, "context": e.context}) for e in examples[:3])
    monkeypatch.setattr("sys.stdin", io.StringIO(lines + "\n"))
    assert cli.main(["generate", "--model", str(tiny_bert)]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    direct = answer_questions(model, tok, examples[:3], QAData().within(256))
    assert [o["answer"] for o in out] == [d["answer"] for d in direct]
    assert all(o["answer"] in e.context for o, e in zip(out, examples))

    rep_dir = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(tiny_bert), "--tasks", f"qa:{SQUAD}", "--output", str(rep_dir)]) == 0
    rep = json.loads((rep_dir / "eval.json").read_text())["tasks"][f"qa:{SQUAD}"]
    assert rep["examples"] == len(examples) and 0 <= rep["exact_match"] <= rep["f1"] <= 1
    assert "| f1 |" in (rep_dir / "eval.md").read_text()


@pytest.mark.parametrize("line, needle", [
    ('{"question": "q"}', 'input line 2: expected an object with non-empty "question" and "context"'),
    ("not json", "input line 2: not JSON"),
])
def test_generate_names_the_bad_input_line(tiny_bert, capsys, monkeypatch, line, needle):
    import io

    good = json.dumps({"question": "Who?", "context": "Ada wrote it."})
    monkeypatch.setattr("sys.stdin", io.StringIO(good + "\n" + line + "\n"))
    assert cli.main(["generate", "--model", str(tiny_bert)]) == 2
    assert needle in capsys.readouterr().err


def test_bad_qa_training_data_names_file_and_line(tiny_bert, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    rec = {"context": "Ada wrote it.", "question": "Who?", "answers": {"text": ["Ada"], "answer_start": [3]}}
    bad.write_text(json.dumps(dict(rec, answers={"text": ["Ada"], "answer_start": [0]})) + "\n" + json.dumps(rec))
    cfg = {"run_dir": str(tmp_path / "run"), "task": "qa", "method": "full", "model": {"init_from": str(tiny_bert)},
           "data": {"train": [str(bad)], "validation": [str(data[1])]}, "train": {"steps": 1}}
    dump_config(cfg, tmp_path / "bad.yaml")
    assert cli.main(["finetune", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "answer_start 3" in err


def test_qa_examples_fit_a_short_model():
    """Settings shrink to a model's positions: windows fit, and a long context still gets several windows."""
    s = QAData().within(64)
    s.validate()
    assert s.max_length == 64 and s.doc_stride < s.max_length - s.max_question_length - 3
    assert QAData().within(4096) == QAData()
