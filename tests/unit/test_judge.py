"""Pairwise LLM-as-judge: the verdict combination over both orders, Wilson intervals, the local judge (a tiny random
model and the real SmolLM2-135M-Instruct) and the endpoint judge against a live lmforge server."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F

from lmforge.eval.judge import (PAIRWISE_SYSTEM, EndpointJudge, LocalJudge, PairwiseReport, Verdict, combine,
                                judge_messages, judge_pairwise, parse_verdict, wilson_interval)
from lmforge.models import ModelConfig
from lmforge.models.transformer import Transformer

_WORDS = "alpha beta gamma delta seven river stone blue quick lazy dog fox cat".split()


def _tiny(tok, seed: int = 0) -> Transformer:
    """A random 2-layer Llama over the GPT-2 vocabulary (wide init: content-dependent, far from ties)."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                   num_kv_heads=2, intermediate_size=64, max_position_embeddings=1024,
                                   eos_token_id=tok.eos_id, initializer_range=0.5)).eval()


def _random_items(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(seed)
    qs = [f"Question {i}: what is {rng.choice(_WORDS)}?" for i in range(n)]
    a = [" ".join(rng.choices(_WORDS, k=rng.randint(1, 8))) for _ in qs]
    b = [" ".join(rng.choices(_WORDS, k=rng.randint(1, 8))) for _ in qs]
    return qs, a, b


class _Scripted:
    """A judge replaying fixed verdicts per (first, second) pair: tests the combination arithmetic alone."""

    def __init__(self, table: dict[tuple[str, str], str]):
        self.table = table

    def verdicts(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[Verdict]:
        return [Verdict(self.table[(a, b)]) for a, b in zip(firsts, seconds)]  # type: ignore[arg-type]

    def judge_input(self, prompt: str, first: str, second: str):
        return judge_messages(prompt, first, second)


# ---- pure logic


def test_parse_verdict():
    assert parse_verdict("Assistant A is more accurate. [[A]]") == "A"
    assert parse_verdict("[[B]]") == "B"
    assert parse_verdict("Both are equally good: [[ C ]]") == "C"
    # the format instruction echoed first, the final verdict last: the last one counts
    assert parse_verdict('Output "[[A]]" if A is better... My final verdict: [[B]]') == "B"
    for bad in ("", None, "A is better", "[A]", "[[D]]", "[[a]]", "[[AB]]"):
        assert parse_verdict(bad) == "invalid", bad


def test_judge_messages_layout():
    m = judge_messages("Q?", "ans one", "ans two")
    assert [x["role"] for x in m] == ["system", "user"] and m[0]["content"] == PAIRWISE_SYSTEM
    u = m[1]["content"]
    assert u.index("[User Question]\nQ?") < u.index("[The Start of Assistant A's Answer]\nans one\n"
                                                    "[The End of Assistant A's Answer]") \
        < u.index("[The Start of Assistant B's Answer]\nans two\n[The End of Assistant B's Answer]")


def test_combine_all_verdict_pairs():
    # ab: a shown as Assistant A; ba: b shown as Assistant A
    expect = {("A", "B"): "win", ("B", "A"): "loss",  # both orders agree
              ("A", "A"): "tie", ("B", "B"): "tie",  # position bias: the orders disagree
              ("C", "C"): "tie", ("A", "C"): "tie", ("C", "B"): "tie", ("invalid", "B"): "tie",
              ("A", "invalid"): "tie", ("invalid", "invalid"): "tie"}
    pairs = list(expect)
    assert combine([p[0] for p in pairs], [p[1] for p in pairs]) == [expect[p] for p in pairs]
    with pytest.raises(ValueError, match="one verdict per order"):
        combine(["A"], [])


def test_report_arithmetic_with_scripted_judge():
    # 3 items a clearly better (A when a first, B when b first), 1 b better, 1 disagreement, 1 invalid
    table = {("a0", "b0"): "A", ("b0", "a0"): "B", ("a1", "b1"): "A", ("b1", "a1"): "B",
             ("a2", "b2"): "A", ("b2", "a2"): "B", ("a3", "b3"): "B", ("b3", "a3"): "A",
             ("a4", "b4"): "A", ("b4", "a4"): "A", ("a5", "b5"): "invalid", ("b5", "a5"): "B"}
    qs = [f"q{i}" for i in range(6)]
    a = [f"a{i}" for i in range(6)]
    b = [f"b{i}" for i in range(6)]
    r = judge_pairwise(_Scripted(table), qs, a, b)
    assert (r.n, r.wins, r.ties, r.losses) == (6, 3, 2, 1)
    assert (r.win_rate, r.tie_rate, r.loss_rate) == (0.5, 2 / 6, 1 / 6)
    assert r.score == pytest.approx((3 + 2 / 2) / 6)
    scores = [1, 1, 1, 0, 0.5, 0.5]
    se = math.sqrt(sum((s - r.score) ** 2 for s in scores) / 5 / 6)
    assert r.score_ci == pytest.approx((r.score - 1.959964 * se, r.score + 1.959964 * se))
    assert r.win_ci == wilson_interval(3, 6) and r.loss_ci == wilson_interval(1, 6)
    assert r.inconsistent == 2 and r.invalid == 1  # item 4 disagrees; item 5: invalid vs "a", also inconsistent
    assert r.verdict_counts == {"A": 6, "B": 5, "C": 0, "invalid": 1}
    assert [it["outcome"] for it in r.items] == ["win", "win", "win", "loss", "tie", "tie"]
    assert (r.items[3]["ab"], r.items[3]["ba"]) == ("B", "A")
    assert r.prompt == judge_messages("q0", "a0", "b0") and r.p_margin is None
    d = r.to_dict()
    assert d["win_ci"] == list(r.win_ci) and d["p_margin_ci"] is None and d["items"][0]["outcome"] == "win"

    swapped = judge_pairwise(_Scripted(table), qs, b, a)
    assert (swapped.wins, swapped.ties, swapped.losses) == (1, 2, 3)


def test_judge_pairwise_validates_inputs():
    j = _Scripted({})
    with pytest.raises(ValueError, match="at least one prompt"):
        judge_pairwise(j, [], [], [])
    with pytest.raises(ValueError, match="2 prompts, 1 answers from model a, 2 from model b"):
        judge_pairwise(j, ["q", "r"], ["x"], ["y", "z"])
    with pytest.raises(ValueError, match=r"answers_b\[1\] must be a string, found NoneType"):
        judge_pairwise(j, ["q", "r"], ["x", "y"], ["y", None])


@pytest.mark.parametrize("k,n", [(0, 1), (0, 10), (3, 10), (10, 10), (17, 40), (1, 200)])
def test_wilson_interval(k, n):
    z = 1.959963984540054
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = wilson_interval(k, n)
    assert (lo, hi) == pytest.approx((center - half, center + half), abs=1e-12)
    assert 0 <= lo <= p <= hi <= 1 and hi - lo > 0
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_interval_rejects_bad_counts():
    for k, n in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson_interval(k, n)


# ---- local judge


def test_local_judge_identical_answers_tie_tiny(gpt2_tokenizer):
    qs, a, _ = _random_items(10)
    r = judge_pairwise(LocalJudge(_tiny(gpt2_tokenizer), gpt2_tokenizer), qs, a, a)
    assert r.tie_rate >= 0.95 and r.wins == r.losses == 0
    # the random judge does pick sides (A or B), so only the two orders cancel them
    assert r.verdict_counts["A"] + r.verdict_counts["B"] > 0
    assert r.inconsistent == sum(it["ab"] != "C" for it in r.items)
    assert r.p_margin == pytest.approx(0.0, abs=1e-9)


def test_local_judge_swap_swaps_win_and_loss(gpt2_tokenizer):
    qs, a, b = _random_items(12)
    judge = LocalJudge(_tiny(gpt2_tokenizer), gpt2_tokenizer, batch_size=7)
    r, s = judge_pairwise(judge, qs, a, b), judge_pairwise(judge, qs, b, a)
    assert r.wins != r.losses  # the swap is visible
    assert (s.wins, s.ties, s.losses) == (r.losses, r.ties, r.wins)
    assert [it["outcome"] for it in s.items] == [{"win": "loss", "loss": "win", "tie": "tie"}[it["outcome"]]
                                                 for it in r.items]
    assert s.p_margin == pytest.approx(-r.p_margin, abs=1e-6)
    assert s.score == pytest.approx(1 - r.score)


def test_local_judge_scores_verdict_tokens(gpt2_tokenizer):
    """The verdict and probabilities are those of the model's next token after the judge prompt (plain layout
    without a chat template), restricted to A / B / C."""
    model = _tiny(gpt2_tokenizer, seed=3)
    judge = LocalJudge(model, gpt2_tokenizer)
    qs, a, b = _random_items(3, seed=5)
    got = judge.verdicts(qs, a, b)
    for q, x, y, v in zip(qs, a, b, got):
        text = judge.judge_input(q, x, y)
        assert text.startswith(PAIRWISE_SYSTEM) and text.endswith("Final verdict: [[") and x in text
        ids = torch.tensor([gpt2_tokenizer.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            logp = F.log_softmax(model(ids).logits[0, -1].float(), -1)
        letters = [gpt2_tokenizer.encode(c, add_special_tokens=False)[0] for c in "ABC"]
        p = torch.softmax(logp[letters], -1)
        assert v.choice == "ABC"[int(p.argmax())]
        assert [v.detail["p"][c] for c in "ABC"] == pytest.approx(p.tolist(), abs=1e-4)


def test_local_judge_rejects_prompt_too_long(gpt2_tokenizer):
    judge = LocalJudge(_tiny(gpt2_tokenizer), gpt2_tokenizer)
    with pytest.raises(ValueError, match="judge prompt 1 has .* tokens; the judge model takes 1024"):
        judge.verdicts(["q", "q"], ["short", "word " * 1200], ["short", "x"])


def test_local_judge_identical_answers_tie_smollm2(smollm2):
    model, tok = smollm2
    qs = ["What is the capital of France?", "How many legs does a spider have?", "What is 2 + 3?"]
    ans = ["The capital of France is Paris.", "A spider has eight legs.", "2 + 3 = 5."]
    judge = LocalJudge(model, tok)
    r = judge_pairwise(judge, qs, ans, ans)
    assert r.tie_rate >= 0.95 and r.invalid == 0
    assert isinstance(r.prompt, str) and r.prompt.endswith("<|im_start|>assistant\n[[")  # the chat template
    assert r.prompt.count("The capital of France is Paris.") == 2


# ---- endpoint judge against a live lmforge server


def _verdict_bot(tok) -> Transformer:
    """A tiny model rigged to a bigram chain that always replies "[[B]]" then EOS: attention and MLP outputs are
    zero, so the next token depends on the current token alone (embedding class -> LM-head row)."""
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, intermediate_size=64, max_position_embeddings=1024,
                                    eos_token_id=tok.eos_id, tie_embeddings=False)).eval()
    chain = tok.encode("[[B]]", add_special_tokens=False) + [tok.eos_id]  # [[, B, ]], eos
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o.weight.zero_()
            block.mlp.down.weight.zero_()
        emb, head = model.embed.tokens.weight, model.lm_head.weight
        emb.zero_()
        head.zero_()
        emb[:, 0] = 1.0  # any other token -> class 0 -> "[["
        for k, t in enumerate(chain[:-1], start=1):
            emb[t].zero_()
            emb[t, k] = 1.0
        for k, t in enumerate(chain):
            head[t, k] = 10.0
    return model


@pytest.fixture(scope="module")
def verdict_server(gpt2_tokenizer):
    from lmforge.inference.bridge import AsyncEngine
    from lmforge.inference.engine import Engine, EngineConfig
    from lmforge.inference.http import start_server
    from lmforge.inference.routes import create_app

    ae = AsyncEngine(Engine(_verdict_bot(gpt2_tokenizer), gpt2_tokenizer, EngineConfig(kv_cache_gb=0.05)),
                     max_queue=64)
    server = start_server(create_app(ae, gpt2_tokenizer, "judge", api_key=None), port=0)
    yield f"http://127.0.0.1:{server.port}/v1"
    server.stop()
    ae.close()


def test_endpoint_judge_live_server(verdict_server):
    qs, a, b = _random_items(4)
    r = judge_pairwise(EndpointJudge(verdict_server, "judge", max_tokens=16), qs, a, b)
    assert isinstance(r, PairwiseReport)
    # the server's reply is parsed: always "[[B]]", i.e. b when a is shown first, a when b is: all ties
    assert [it["ab_detail"]["text"] for it in r.items] == ["[[B]]"] * 4
    assert r.verdict_counts == {"A": 0, "B": 8, "C": 0, "invalid": 0}
    assert (r.wins, r.ties, r.losses, r.inconsistent, r.invalid) == (0, 4, 0, 4, 0)
    assert r.score == 0.5 and r.p_margin is None
    assert r.prompt == judge_messages(qs[0], a[0], b[0])


def test_endpoint_judge_counts_unparseable_replies(verdict_server):
    qs, a, b = _random_items(3)
    r = judge_pairwise(EndpointJudge(verdict_server, "judge", max_tokens=2, concurrency=2), qs, a, b)
    assert [it["ab_detail"]["text"] for it in r.items] == ["[[B"] * 3  # cut off before the closing brackets
    assert r.invalid == 6 and r.verdict_counts["invalid"] == 6
    assert (r.wins, r.ties, r.losses, r.inconsistent) == (0, 3, 0, 0)
    assert r.tie_ci == wilson_interval(3, 3)


# ---- real signal (slow): SmolLM2-135M-Instruct judging right answers against wrong ones

_FACTS = [
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin."),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has three legs."),
    ("What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 9."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day.", "The sky is green on a clear day."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.",
     "Charles Dickens wrote Romeo and Juliet."),
    ("What is the boiling point of water at sea level in Celsius?", "Water boils at 100 degrees Celsius at sea level.",
     "Water boils at 12 degrees Celsius at sea level."),
    ("What is the largest planet in the Solar System?", "Jupiter is the largest planet in the Solar System.",
     "Mercury is the largest planet in the Solar System."),
    ("How many days are in a week?", "There are seven days in a week.", "There are four days in a week."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au.",
     "The chemical symbol for gold is Fe."),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "The opposite of hot is purple."),
    ("What is 10 times 10?", "10 times 10 is 100.", "10 times 10 is 7."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle.",
     "The goldfish is known as the king of the jungle."),
]


@pytest.mark.slow
def test_smollm2_judge_real_signal(smollm2):
    """SmolLM2-135M is too small to judge: its hard verdicts follow the position (mostly "A"), so the two orders
    disagree and every item ties. Its probabilities still lean, weakly, towards the right answer against "I don't
    know", which the position-debiased `p_margin` shows (observed about +0.01; asserted only > 0)."""
    model, tok = smollm2
    qs = [q for q, _, _ in _FACTS]
    right = [r for _, r, _ in _FACTS]
    judge = LocalJudge(model, tok)
    for other in ([w for _, _, w in _FACTS], ["I don't know."] * len(_FACTS)):
        r = judge_pairwise(judge, qs, right, other)
        assert r.n == len(_FACTS) and r.invalid == 0 and r.wins + r.ties + r.losses == r.n
        assert r.losses <= r.wins + 1  # never clearly prefers the wrong answer
        assert r.verdict_counts["A"] > r.verdict_counts["B"]  # the position bias both orders are there to cancel
        assert -1 <= r.p_margin_ci[0] <= r.p_margin <= r.p_margin_ci[1] <= 1
    assert r.p_margin > 0  # right answers over "I don't know."
