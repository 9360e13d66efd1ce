"""Evaluation primitives (loglikelihood, rolling loglikelihood, bits per byte) against direct full-forward sums,
and the multiple-choice readers (HellaSwag / MMLU / ARC formats, bad input)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.readers import DataError
from lmforge.eval.harness import bits_per_byte, loglikelihood, rolling_loglikelihood, rolling_windows
from lmforge.eval.multiple_choice import build_requests, read_multiple_choice
from lmforge.models.transformer import Transformer


@pytest.fixture
def tiny(tiny_llama_cfg):
    tiny_llama_cfg.initializer_range = 0.5  # peaked distributions, so greedy tokens exist and ties do not
    return Transformer(tiny_llama_cfg).eval()


def _logp(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)  # (T, V)


def _direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    lp = _logp(model, ctx + cont)
    rows = [lp[len(ctx) - 1 + j] for j in range(len(cont))]
    return sum(float(r[t]) for r, t in zip(rows, cont)), all(int(r.argmax()) == t for r, t in zip(rows, cont))


def test_loglikelihood_matches_full_forward(tiny):
    reqs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([1, 2, 3], [7, 8, 9, 10]), ([5, 6], [7]),
            ([9] * 12, [1, 2]), ([3], [4, 4, 4]), ([1, 2, 3], [])]
    for bs in (1, 3, 16):
        got = loglikelihood(tiny, reqs, batch_size=bs)
        for (ctx, cont), (lp, greedy) in zip(reqs, got):
            want, want_greedy = _direct(tiny, ctx, cont) if cont else (0.0, True)
            assert lp == pytest.approx(want, abs=1e-4) and greedy == want_greedy


def test_is_greedy_true_for_argmax_continuation(tiny):
    ctx = [5, 9, 2]
    cont = []
    for _ in range(3):  # build the greedy continuation token by token
        cont.append(int(_logp(tiny, ctx + cont)[-1].argmax()))
    wrong = cont[:2] + [(cont[2] + 1) % tiny.cfg.vocab_size]
    (lp, g1), (_, g2) = loglikelihood(tiny, [(ctx, cont), (ctx, wrong)])
    assert g1 is True and g2 is False
    assert lp == pytest.approx(_direct(tiny, ctx, cont)[0], abs=1e-4)


def test_loglikelihood_left_truncates_long_context(tiny):
    ctx, cont = list(range(1, 80)), [5, 6]  # 81 tokens > 64 positions
    (lp, _), = loglikelihood(tiny, [(ctx, cont)])
    keep = ctx[-(64 + 1 - len(cont)):]
    assert lp == pytest.approx(_direct(tiny, keep, cont)[0], abs=1e-4)
    with pytest.raises(ValueError, match="empty context"):
        loglikelihood(tiny, [([], [1])])


def test_rolling_whole_window_equals_direct(tiny):
    ids = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5]
    lp = _logp(tiny, [0] + ids)
    want = sum(float(lp[i, t]) for i, t in enumerate(ids))
    got, n = rolling_loglikelihood(tiny, ids, max_length=32, stride=8, prefix_token_id=0)
    assert n == len(ids) and got == pytest.approx(want, abs=1e-4)
    got, n = rolling_loglikelihood(tiny, ids, max_length=32, stride=8)  # no prefix: the first token is context
    lp = _logp(tiny, ids)
    assert n == len(ids) - 1 and got == pytest.approx(sum(float(lp[i, t]) for i, t in enumerate(ids[1:])), abs=1e-4)


@pytest.mark.parametrize("stride", [16, 5, 1])
def test_rolling_sliding_windows_equal_manual_sum(tiny, stride):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (50,), generator=g).tolist()
    seq, max_len = [0] + ids, 16
    want, done = 0.0, 0
    while done < len(ids):  # manual: score targets done+1..end with the max_len tokens before each window end
        n = min(max_len if done == 0 else stride, len(ids) - done)
        end = done + n
        start = max(0, end - max_len)
        lp = _logp(tiny, seq[start:end])
        want += sum(float(lp[end - start - n + j, seq[end - n + 1 + j]]) for j in range(n))
        done = end
    got, count = rolling_loglikelihood(tiny, ids, max_length=max_len, stride=stride, prefix_token_id=0, batch_size=3)
    assert count == len(ids) and got == pytest.approx(want, abs=1e-3)


def test_rolling_windows_match_lm_eval_shape():
    # lm-eval (context_len=1): windows of max_len inputs, disjoint predictions, the last one right-aligned
    assert rolling_windows(11, 4, 4) == [(0, 4, 4), (4, 8, 4), (6, 10, 2)]
    assert rolling_windows(1, 4, 4) == []
    with pytest.raises(ValueError, match="stride"):
        rolling_windows(10, 4, 5)


def test_bits_per_byte():
    assert bits_per_byte(-math.log(2) * 80, 10) == pytest.approx(8.0)
    assert bits_per_byte(0.0, 3) == 0.0
    with pytest.raises(ValueError):
        bits_per_byte(-1.0, 0)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_hellaswag_mmlu_arc(tmp_path):
    hs = _jsonl(tmp_path / "hs.jsonl", [{"activity_label": "Cooking", "ctx_a": "A man cuts [title] onions.",
                                         "ctx_b": "then he", "endings": [" fries them.", "sings  loudly."],
                                         "label": "1"}])
    (item,) = read_multiple_choice(hs)
    assert item.query == "Cooking: A man cuts. onions. Then he" and item.choices == ["fries them.", "sings loudly."]
    assert item.gold == 1 and item.source.endswith("hs.jsonl:1")
    mmlu = _jsonl(tmp_path / "mmlu.jsonl", [{"question": " 2+2? ", "choices": ["3", "4"], "answer": "B"}])
    (item,) = read_multiple_choice(mmlu)
    assert (item.query, item.choices, item.gold) == ("Question: 2+2?\nAnswer:", ["3", "4"], 1)
    (item,) = read_multiple_choice(mmlu, mmlu_template="letters")
    assert (item.query, item.choices) == ("2+2?\nA. 3\nB. 4\nAnswer:", ["A", "B"])
    arc = _jsonl(tmp_path / "arc.jsonl", [{"question": "Sky?", "choices": {"text": ["red", "blue"], "label": ["1", "2"]},
                                           "answerKey": "2"}])
    (item,) = read_multiple_choice(arc, fmt="arc")
    assert (item.query, item.choices, item.gold) == ("Question: Sky?\nAnswer:", ["red", "blue"], 1)
    csv = tmp_path / "mmlu.csv"
    csv.write_text('question,A,B,C,answer\nWhat?,x,y,z,C\n')
    (item,) = read_multiple_choice(csv)
    assert item.choices == ["x", "y", "z"] and item.gold == 2 and item.source.endswith("mmlu.csv:2")


def test_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"question": "Q", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "C"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arc.parquet")
    (item,) = read_multiple_choice(tmp_path / "arc.parquet")
    assert item.gold == 2 and item.source.endswith("arc.parquet:row 1")


@pytest.mark.parametrize("rows, match", [
    ([{"question": "q", "choices": ["a", "b"], "answer": 0}, {"question": "q", "choices": ["a", "b"]}],
     r"bad\.jsonl:2: missing field 'answer'"),
    ([{"question": "q", "choices": ["a", "b"], "answer": 2}], r"bad\.jsonl:1: label answer=2 is out of range"),
    ([{"ctx": "c", "endings": ["a", "b"], "label": -1}], r"bad\.jsonl:1: label label=-1 is out of range"),
    ([{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "Z"}], r"bad\.jsonl:1: .*one of \['A'\]"),
    ([{"ctx": "c", "label": 0, "endings": []}], r"bad\.jsonl:1: field 'endings' must be a non-empty list"),
    ([{"text": "hello"}], r"bad\.jsonl:1: cannot tell the multiple-choice format"),
])
def test_bad_items_name_file_and_line(tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        read_multiple_choice(_jsonl(tmp_path / "bad.jsonl", rows))


def test_empty_file_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        read_multiple_choice(tmp_path / "empty.jsonl")


def test_fewshot_excludes_item_and_is_seeded(tmp_path):
    rows = [{"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2} for i in range(6)]
    items = read_multiple_choice(_jsonl(tmp_path / "m.jsonl", rows))
    reqs = build_requests(items, num_fewshot=3, seed=7)
    assert reqs == build_requests(items, num_fewshot=3, seed=7)
    for i, (ctx, conts) in enumerate(reqs):
        shots = ctx.split("\n\n")
        assert len(shots) == 4 and shots[-1] == f"Question: q{i}\nAnswer:" and conts == [" a", " b"]
        assert all(f"q{i}\n" not in s for s in shots[:-1])
        assert all(s.endswith(" a") or s.endswith(" b") for s in shots[:-1])
