"""LLM-as-judge, pairwise: a judge model compares two models' answers to the same prompts (the MT-Bench "pair-v2"
prompt of Zheng et al., 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena") and the report gives the
win / tie / loss rates of model a against model b with 95% confidence intervals.

Every item is judged in both orders (a shown as Assistant A, then as Assistant B): a model wins an item only when
both orders prefer it; a disagreement between the orders (position bias), a tie or an unparseable verdict counts
as a tie, as in the paper's "conservative" combination. So identical answers always tie, whatever the judge's bias.

Judges: `LocalJudge` (an lmforge model; picks the most likely of the verdict tokens "A", "B", "C" after the prompt
ending in "[[", since small models rarely follow the output format when generating) and `EndpointJudge` (any
OpenAI-compatible chat endpoint, including `lmforge serve`; the verdict is parsed from the generated text).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from ..tokenizer.base import Tokenizer
from .harness import loglikelihood
from .metrics import mean_stderr

__all__ = ["PAIRWISE_SYSTEM", "VERDICT_PREFIX", "judge_messages", "parse_verdict", "wilson_interval", "Verdict",
           "Judge", "LocalJudge", "EndpointJudge", "PairwiseReport", "combine", "judge_pairwise"]

PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of the "
    "responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective as "
    "possible. After providing your explanation, output your final verdict by strictly following this format: "
    "\"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)
"""MT-Bench's pairwise judge instruction (FastChat `judge_prompts.jsonl`, "pair-v2"), verbatim."""

VERDICT_PREFIX = "[["
"""What the local judge's reply starts with; the next token is the verdict."""

Choice = Literal["A", "B", "C", "invalid"]
_VERDICT_RE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_Z95 = 1.959963984540054  # standard normal quantile 0.975


def judge_messages(question: str, answer_a: str, answer_b: str, system: str = PAIRWISE_SYSTEM) -> list[dict[str, str]]:
    """The chat messages asking the judge which of two answers to `question` is better (MT-Bench pair-v2 layout)."""
    user = (f"[User Question]\n{question}\n\n"
            f"[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
            f"[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_verdict(text: str | None) -> Choice:
    """The verdict in a judge's reply: the *last* "[[A]]", "[[B]]" or "[[C]]" (a reply may quote the format before
    giving its final verdict, which comes last); "invalid" when there is none."""
    found = _VERDICT_RE.findall(text or "")
    return found[-1] if found else "invalid"  # type: ignore[return-value]


def wilson_interval(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (default 95%); unlike the normal interval it stays inside
    [0, 1] and has a width at 0 and n successes, which small judge sets hit."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, found successes={successes}, n={n}")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # exact ends at 0 and n successes (the formula gives them only up to rounding)
    return (0.0 if successes == 0 else max(0.0, center - half)), (1.0 if successes == n else min(1.0, center + half))


@dataclass
class Verdict:
    """One judgment: which of the two shown answers is better, and what it rests on."""

    choice: Choice
    """"A" (first shown), "B" (second shown), "C" (tie) or "invalid" (no verdict could be read)."""
    detail: dict[str, Any] = field(default_factory=dict)
    """LocalJudge: {"p": {"A", "B", "C" -> probability}}; EndpointJudge: {"text": the judge's reply}."""


class Judge(Protocol):
    """Anything that compares answer pairs; both judges below implement it (tests may script one)."""

    def verdicts(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[Verdict]:
        """A verdict per item comparing firsts[i] (shown as Assistant A) with seconds[i] (Assistant B)."""
        ...

    def judge_input(self, prompt: str, first: str, second: str) -> Any:
        """The exact input the judge sees for one comparison (text or messages), for the report."""
        ...


class LocalJudge:
    """A local lmforge model as judge: the verdict is the most likely of "A", "B", "C" after the judge prompt and
    the reply prefix "[[", scored by log-likelihood (no generation, so even small models give a valid verdict)."""

    def __init__(self, model: Any, tokenizer: Tokenizer, batch_size: int = 16, system: str = PAIRWISE_SYSTEM):
        self.model, self.tokenizer, self.batch_size, self.system = model, tokenizer, batch_size, system
        self.choices = {c: tokenizer.encode(c, add_special_tokens=False) for c in "ABC"}
        if any(not ids for ids in self.choices.values()):
            raise ValueError("the judge tokenizer encodes a verdict letter (A, B or C) to no tokens")

    def judge_input(self, prompt: str, first: str, second: str) -> str:
        """The judge prompt as text: the chat template (generation prompt added) or a plain layout, then "[["."""
        messages = judge_messages(prompt, first, second, self.system)
        if self.tokenizer.chat_template:
            from ..tokenizer.chat import render

            return render(self.tokenizer, messages, add_generation_prompt=True) + VERDICT_PREFIX
        return f"{messages[0]['content']}\n\n{messages[1]['content']}\n\nFinal verdict: {VERDICT_PREFIX}"

    def verdicts(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[Verdict]:
        """Score the three verdicts of every item in batches; each distinct prompt runs once."""
        limit = self.model.cfg.max_position_embeddings
        contexts: list[tuple[int, ...]] = []
        for i, (q, a, b) in enumerate(zip(prompts, firsts, seconds)):
            ids = tuple(self.tokenizer.encode(self.judge_input(q, a, b), add_special_tokens=False))
            if len(ids) + max(map(len, self.choices.values())) > limit:
                raise ValueError(f"judge prompt {i} has {len(ids)} tokens; the judge model takes {limit}: "
                                 f"shorten the answers")
            contexts.append(ids)
        # a canonical order (longest first, then by ids): which prompts share a batch does not depend on the item
        # order, so swapping the models swaps the verdicts exactly even where batch shape changes the numerics
        unique = sorted(set(contexts), key=lambda c: (-len(c), c))
        requests = [(list(c), self.choices[k]) for c in unique for k in "ABC"]
        scores = loglikelihood(self.model, requests, batch_size=self.batch_size)
        by_ctx: dict[tuple[int, ...], Verdict] = {}
        for j, ctx in enumerate(unique):
            lp = [scores[3 * j + k][0] for k in range(3)]
            top = max(lp)
            z = sum(math.exp(v - top) for v in lp)
            probs = {k: math.exp(v - top) / z for k, v in zip("ABC", lp)}
            best = "ABC"[lp.index(top)]  # an exact tie goes to the earlier letter
            by_ctx[ctx] = Verdict(best, {"p": probs})  # type: ignore[arg-type]
        return [Verdict(by_ctx[c].choice, dict(by_ctx[c].detail)) for c in contexts]


class EndpointJudge:
    """Any OpenAI-compatible chat endpoint as judge (a hosted model, vLLM, `lmforge serve`): greedy replies
    (temperature 0), the verdict parsed with `parse_verdict`; replies without one count as "invalid"."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 512,
                 client: Any = None, concurrency: int = 4, timeout: float = 300.0, system: str = PAIRWISE_SYSTEM):
        if client is None:
            try:
                import openai
            except ImportError as e:
                raise ImportError("EndpointJudge needs the openai client: pip install 'lmforge[serve]'") from e
            key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "none")
            client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout)
        self.client, self.model, self.max_tokens = client, model, max_tokens
        self.concurrency, self.system = max(1, concurrency), system

    def judge_input(self, prompt: str, first: str, second: str) -> list[dict[str, str]]:
        """The messages sent for one comparison."""
        return judge_messages(prompt, first, second, self.system)

    def _one(self, messages: list[dict[str, str]]) -> Verdict:
        reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                    max_tokens=self.max_tokens)
        text = reply.choices[0].message.content if reply.choices else None
        return Verdict(parse_verdict(text), {"text": text or ""})

    def verdicts(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> list[Verdict]:
        """Ask the endpoint for every item, `concurrency` requests in flight (the server batches them)."""
        msgs = [self.judge_input(q, a, b) for q, a, b in zip(prompts, firsts, seconds)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, msgs))


@dataclass
class PairwiseReport:
    """Model a against model b as judged pairwise in both orders; rates are fractions of `n` items."""

    n: int
    wins: int
    """Items where both orders preferred model a."""
    ties: int
    """Items judged a tie, or where the two orders disagreed, or with an invalid verdict."""
    losses: int
    """Items where both orders preferred model b."""
    win_rate: float
    tie_rate: float
    loss_rate: float
    win_ci: tuple[float, float]
    """95% Wilson interval of the win rate (likewise tie_ci, loss_ci)."""
    tie_ci: tuple[float, float]
    loss_ci: tuple[float, float]
    score: float
    """(wins + ties / 2) / n: 0.5 means no difference."""
    score_ci: tuple[float, float]
    """95% normal-approximation interval of the mean of the per-item scores 1 / 0.5 / 0, clipped to [0, 1]."""
    inconsistent: int
    """Items whose two orders gave different preferences (position bias); invalid verdicts count as no preference."""
    invalid: int
    """Verdicts (of 2n) that could not be read; each counts as a tie for its order."""
    p_margin: float | None
    """Judges with probabilities (LocalJudge): mean over items of ½[(p_A - p_B, a first) + (p_B - p_A, b first)],
    in [-1, 1], > 0 favours a. Position bias cancels in the sum, so it shows a weak judge's signal even when its
    hard verdicts all flip with the order (all ties). None for other judges."""
    p_margin_ci: tuple[float, float] | None
    """95% normal-approximation interval of `p_margin`."""
    verdict_counts: dict[str, int]
    """How often the judge said A / B / C / invalid over all 2n verdicts (A >> B shows position bias)."""
    prompt: Any
    """The exact judge input of the first item, model a shown first."""
    items: list[dict[str, Any]]
    """Per item: `ab` (verdict with a shown first), `ba` (b shown first), `outcome` (win/tie/loss), details."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (intervals as [low, high])."""
        d = asdict(self)
        for k in ("win_ci", "tie_ci", "loss_ci", "score_ci", "p_margin_ci"):
            d[k] = None if d[k] is None else list(d[k])
        return d


def _preference(choice: str, a_first: bool) -> str:
    """Which model ("a", "b" or "" for none) a verdict prefers, given which model was shown as Assistant A."""
    if choice == "A":
        return "a" if a_first else "b"
    if choice == "B":
        return "b" if a_first else "a"
    return ""  # tie or invalid


def combine(ab: Sequence[str], ba: Sequence[str]) -> list[str]:
    """Per-item outcome for model a from the verdicts with a shown first (`ab`) and b shown first (`ba`): "win"
    when both orders prefer a, "loss" when both prefer b, else "tie" (disagreement, tie, invalid)."""
    if len(ab) != len(ba):
        raise ValueError(f"need one verdict per order for every item, found {len(ab)} and {len(ba)}")
    out = []
    for x, y in zip(ab, ba):
        p, q = _preference(x, True), _preference(y, False)
        out.append("win" if p == q == "a" else "loss" if p == q == "b" else "tie")
    return out


def judge_pairwise(judge: Judge, prompts: Sequence[str], answers_a: Sequence[str],
                   answers_b: Sequence[str]) -> PairwiseReport:
    """Judge model a's answers against model b's on the same prompts, each item in both orders, and report the
    win / tie / loss rates of a with 95% intervals (see the module docstring for the combination)."""
    n = len(prompts)
    if n == 0:
        raise ValueError("judge_pairwise needs at least one prompt")
    if len(answers_a) != n or len(answers_b) != n:
        raise ValueError(f"need one answer per prompt from each model: {n} prompts, {len(answers_a)} answers from "
                         f"model a, {len(answers_b)} from model b")
    for name, seq in (("prompts", prompts), ("answers_a", answers_a), ("answers_b", answers_b)):
        bad = next((i for i, s in enumerate(seq) if not isinstance(s, str)), None)
        if bad is not None:
            raise ValueError(f"{name}[{bad}] must be a string, found {type(seq[bad]).__name__}")

    both = judge.verdicts(list(prompts) * 2, list(answers_a) + list(answers_b), list(answers_b) + list(answers_a))
    if len(both) != 2 * n:
        raise ValueError(f"the judge returned {len(both)} verdicts for {2 * n} comparisons")
    ab, ba = both[:n], both[n:]
    outcomes = combine([v.choice for v in ab], [v.choice for v in ba])
    wins, losses = outcomes.count("win"), outcomes.count("loss")
    ties = n - wins - losses
    scores = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in outcomes]
    mean, se = mean_stderr(scores)
    margin, margin_ci = None, None
    if all("p" in v.detail for v in both):
        margins = [((x.detail["p"]["A"] - x.detail["p"]["B"]) + (y.detail["p"]["B"] - y.detail["p"]["A"])) / 2
                   for x, y in zip(ab, ba)]
        margin, m_se = mean_stderr(margins)
        margin_ci = (max(-1.0, margin - _Z95 * m_se), min(1.0, margin + _Z95 * m_se))
    counts = {k: sum(v.choice == k for v in both) for k in ("A", "B", "C", "invalid")}
    items = [{"ab": x.choice, "ba": y.choice, "outcome": o, "ab_detail": x.detail, "ba_detail": y.detail}
             for x, y, o in zip(ab, ba, outcomes)]
    return PairwiseReport(
        n=n, wins=wins, ties=ties, losses=losses,
        win_rate=wins / n, tie_rate=ties / n, loss_rate=losses / n,
        win_ci=wilson_interval(wins, n), tie_ci=wilson_interval(ties, n), loss_ci=wilson_interval(losses, n),
        score=mean, score_ci=(max(0.0, mean - _Z95 * se), min(1.0, mean + _Z95 * se)),
        inconsistent=sum(_preference(x.choice, True) != _preference(y.choice, False) for x, y in zip(ab, ba)),
        invalid=counts["invalid"], p_margin=margin, p_margin_ci=margin_ci, verdict_counts=counts,
        prompt=judge.judge_input(prompts[0], answers_a[0], answers_b[0]), items=items)
