"""Evaluation tasks run on a model: one runner per task kind, shared by `lmforge evaluate` and by training (the
trainer's evaluation hook, `training_evaluators`). A runner returns (report, texts): the task's metrics with standard
errors and first prompts, and the text of each example it scored (for the contamination check)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..inference.options import Decoding

__all__ = ["TaskOptions", "RUNNERS", "run_task", "task_evaluator", "training_evaluators", "headline_metrics",
           "headline", "markdown", "uncertainty", "doc_items"]


@dataclass
class TaskOptions(Decoding):
    """How tasks run (the task fields of `lmforge evaluate`): the shared decoding keys, then the tasks' own."""

    max_new_tokens: int = 384
    """Generation, HumanEval and judge tasks: longest answer in tokens."""
    temperature: float = 0.0
    """HumanEval: sampling temperature (0 = greedy, one sample)."""
    top_p: float = 0.95
    """HumanEval with temperature > 0: nucleus sampling threshold (0.95, as the Codex paper)."""
    top_k: int = 0
    """HumanEval with temperature > 0: sample among the k most likely tokens (0 = no limit)."""

    limit: int | None = None
    """Evaluate at most this many examples (documents, questions, problems, prompts) per task."""
    num_fewshot: int = 0
    """Few-shot examples in front of each multiple-choice or generation question (fixed seed)."""
    batch_size: int = 16
    """Sequences per forward pass for log-likelihood and classification tasks."""
    max_length: int | None = None
    """Perplexity window in tokens (default: the model's context length, at most 2048); classification: tokens
    per example (default 128); QA: tokens per window (default 384)."""
    stride: int | None = None
    """Perplexity window step (default: max_length, disjoint windows as lm-eval); QA: tokens shared by consecutive
    windows of a long context (default 128)."""
    samples: int = 1
    """HumanEval: completions per problem (n of pass@k)."""
    k: list[int] = field(default_factory=lambda: [1])
    """HumanEval: the k of pass@k (each <= samples)."""
    chat: bool = False
    """Generation and HumanEval: ask through the chat template (instruct models) instead of a plain prompt."""
    until: list[str] | None = None
    """Generation: stop sequences (default: the format's, e.g. GSM8K's "Question:"; stdlib-doctest: newline)."""
    regex: str | None = None
    """Generation: answer extraction regex, first group of the first match (default: the format's)."""
    judge: str | None = None
    """Judge tasks: the judge, a model (folder, .gguf, alias) or an OpenAI-compatible endpoint URL (http...)."""
    judge_model: str = "default"
    """Judge tasks: the model name to request from a judge endpoint."""
    judge_api_key: str | None = None
    """Judge tasks: API key of the judge endpoint (default: the OPENAI_API_KEY environment variable)."""
    baseline: str | None = None
    """Judge tasks: the model the evaluated model is compared with (folder, .gguf, alias)."""
    seed: int = 1234
    """Seed of few-shot sampling and of HumanEval samples."""

    def validate(self) -> None:
        if self.samples < 1 or any(k < 1 or k > self.samples for k in self.k):
            raise ValueError(f"k must be within 1..samples ({self.samples}), found {self.k}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, found {self.limit}")
        if self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, found {self.num_fewshot}")


def run_task(model, tokenizer, spec: str, opts: TaskOptions) -> tuple[dict[str, Any], list[str]]:
    """(report, example texts) of task `spec` (see eval/tasks.py for the names) on `model`."""
    from .tasks import parse_task

    task = parse_task(spec)
    return RUNNERS[task.kind](model, tokenizer, task, opts)


def task_evaluator(tasks: list[str], tokenizer, opts: TaskOptions) -> Callable[[Any], dict[str, float]]:
    """The trainer's evaluation hook for `tasks`: model -> headline metrics as flat `task/<task>/<metric>`."""
    from .tasks import parse_task

    opts.validate()
    for t in tasks:
        parse_task(t)  # bad names fail before training starts

    def evaluate(model) -> dict[str, float]:
        out: dict[str, float] = {}
        for spec in tasks:
            report, _ = run_task(model, tokenizer, spec, opts)
            out.update({f"task/{spec}/{k}": v for k, v in headline_metrics(report).items()})
        return out

    return evaluate


def training_evaluators(train_cfg, tokenizer) -> list[Callable[[Any], dict[str, float]]]:
    """The evaluators a TrainConfig asks for (its eval_tasks, eval_tasks_limit examples each)."""
    if not train_cfg.eval_tasks:
        return []
    return [task_evaluator(train_cfg.eval_tasks, tokenizer, TaskOptions(limit=train_cfg.eval_tasks_limit))]


def _multiple_choice(model, tok, task, cfg: TaskOptions) -> tuple[dict[str, Any], list[str]]:
    from .multiple_choice import evaluate_multiple_choice, parse_item, read_multiple_choice
    from ..data.stdlib import stdlib_docstring_items

    if task.path is None:
        items = [parse_item(r, f"stdlib-mc item {i}", "mmlu") for i, r in enumerate(stdlib_docstring_items(cfg.limit))]
    else:
        items = read_multiple_choice(task.path)
    rep = evaluate_multiple_choice(model, tok, items, num_fewshot=cfg.num_fewshot, batch_size=cfg.batch_size,
                                   limit=cfg.limit, seed=cfg.seed)
    rep.pop("per_item", None)
    return rep, [f"{it.query} {it.choices[it.gold]}" for it in items[:cfg.limit]]


def _perplexity(model, tok, task, cfg: TaskOptions) -> tuple[dict[str, Any], list[str]]:
    import math

    from .harness import bits_per_byte, rolling_loglikelihood
    from ..data.stdlib import stdlib_heldout_texts
    from .tasks import xz_bits_per_byte

    if task.path is None:
        docs = stdlib_heldout_texts(cfg.limit or 20)
    else:
        from ..data.readers import iter_documents

        docs = [(d.source, d.text) for d in iter_documents(task.path)][:cfg.limit]
    if not docs:
        raise ValueError(f"{task.name}: no documents to score")
    max_length = cfg.max_length or min(model.cfg.max_position_embeddings, 2048)
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    total, tokens = 0.0, 0
    for _, text in docs:
        lp, n = rolling_loglikelihood(model, tok.encode(text, add_special_tokens=False), max_length, cfg.stride,
                                      prefix_token_id=prefix, batch_size=max(1, cfg.batch_size // 4))
        total, tokens = total + lp, tokens + n
    n_bytes = sum(len(t.encode("utf-8")) for _, t in docs)
    return {"documents": len(docs), "tokens": tokens, "bytes": n_bytes, "perplexity": math.exp(-total / tokens),
            "bits_per_byte": bits_per_byte(total, n_bytes), "xz_bits_per_byte": xz_bits_per_byte([t for _, t in docs]),
            "xz": "xz -9e as one raw LZMA2 stream over the documents concatenated (no container overhead)",
            "xz_per_document_bits_per_byte": xz_bits_per_byte([t for _, t in docs], per_document=True),
            "max_length": max_length, "stride": cfg.stride or max_length,
            "examples": [d[0] for d in docs[:3]]}, [t for _, t in docs]


def doc_items(chat: bool) -> list[Any]:
    """stdlib-doc: "What does `module.name` do?" for the functions of held-out modules (the test split of
    `data.align_data.docstring_pairs`, so nothing a model saw in its training pairs), answered in words; the
    target is the function's docstring summary. With `chat` the question is the user turn, else a
    "Question: ...\\nAnswer:" prompt."""
    from ..data.align_data import doc_questions
    from .generation import GenItem

    items = []
    for source, question, answer in doc_questions("test"):
        prompt = question if chat else f"Question: {question}\nAnswer:"
        items.append(GenItem(prompt, answer, f"{prompt} {answer}", source))
    return items


def _generation(model, tok, task, cfg: TaskOptions) -> tuple[dict[str, Any], list[str]]:
    from dataclasses import replace

    from .generation import PROMPT_TARGET, evaluate_generation, parse_generation, read_generation
    from ..data.stdlib import stdlib_doctest_items
    from ..inference.engine import Engine

    if task.name == "stdlib-doc":
        items, spec = doc_items(cfg.chat), PROMPT_TARGET
    elif task.path is None:
        items = [parse_generation(r, r["source"])[0] for r in stdlib_doctest_items(cfg.limit)]
        spec = replace(PROMPT_TARGET, until=["\n"])
    else:
        items, spec = read_generation(task.path)
    spec = replace(spec, until=cfg.until if cfg.until is not None else spec.until,
                   regex=cfg.regex if cfg.regex is not None else spec.regex)
    rep = evaluate_generation(Engine(model, tok), tok, items, spec, num_fewshot=cfg.num_fewshot,
                              max_new_tokens=cfg.max_new_tokens, limit=cfg.limit, seed=cfg.seed, chat=cfg.chat)
    rep.pop("per_item", None)
    return rep, [it.prompt + " " + it.target for it in items[:cfg.limit]]


def _humaneval(model, tok, task, cfg: TaskOptions) -> tuple[dict[str, Any], list[str]]:
    from ..data.code_problems import load_problems
    from .humaneval import evaluate_humaneval
    from ..inference.engine import Engine

    problems = load_problems()[:cfg.limit]
    rep = evaluate_humaneval(Engine(model, tok), tok, problems, n=cfg.samples, k=cfg.k, temperature=cfg.temperature,
                             max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, chat=cfg.chat, top_p=cfg.top_p,
                             top_k=cfg.top_k)
    rep.pop("per_problem", None)
    return rep, [p["prompt"] + p["canonical_solution"] for p in problems]


def _classification(model, tok, task, cfg: TaskOptions) -> tuple[dict[str, Any], list[str]]:
    from .classification import evaluate_classifier

    rep, examples = evaluate_classifier(model, tok, task.path, max_length=cfg.max_length or 128,
                                        batch_size=cfg.batch_size, limit=cfg.limit)
    return rep, [e.text if e.text_pair is None else e.text + " " + e.text_pair for e in examples]


def _qa(model, tok, task, cfg: TaskOptions) -> tuple[dict[str, Any], list[str]]:
    from ..data.qa import QAData, read_qa
    from ..objectives.span import answer_questions
    from .qa import qa_report

    if model.cfg.head != "span":
        raise ValueError(f"task {task.name}: the model has a {model.cfg.head!r} head; qa tasks need a span model "
                         f"(`lmforge finetune` with task qa)")
    examples, _ = read_qa(task.path)
    examples = examples[:cfg.limit] if cfg.limit else examples
    settings = QAData(max_length=cfg.max_length or QAData.max_length,
                      doc_stride=QAData.doc_stride if cfg.stride is None else cfg.stride)
    settings = settings.within(model.cfg.max_position_embeddings)
    rep = qa_report(examples, answer_questions(model, tok, examples, settings, batch_size=cfg.batch_size))
    return rep, [e.context + "\n" + e.question for e in examples]


def _answers(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy chat answers of `model` to each prompt (one batched engine call)."""
    from ..inference.engine import Engine
    from ..inference.sampling import SamplingParams
    from ..tokenizer.chat import encode_chat

    ids = [encode_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True).ids for p in prompts]
    return [o.text for o in Engine(model, tok).generate(ids, SamplingParams(max_new_tokens=max_new_tokens))]


def _judge(model, tok, task, cfg: TaskOptions) -> tuple[dict[str, Any], list[str]]:
    from ..data.readers import DataError, iter_records
    from ..transforms.peft import load
    from .judge import EndpointJudge, LocalJudge, judge_pairwise

    if not cfg.judge or not cfg.baseline:
        raise ValueError(f"{task.name}: judge tasks need judge=MODEL_OR_URL and baseline=MODEL, found "
                         f"judge={cfg.judge!r}, baseline={cfg.baseline!r}")
    prompts = []
    for where, rec in iter_records(task.path):
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
            raise DataError(f"{where}: expected a non-empty string field 'prompt', found fields {sorted(rec)}")
        prompts.append(rec["prompt"])
    prompts = prompts[:cfg.limit]
    dtype = next(model.parameters()).dtype
    answers = _answers(model, tok, prompts, cfg.max_new_tokens)
    base_model, base_tok = load(cfg.baseline, dtype=dtype, device=str(next(model.parameters()).device))
    baseline = _answers(base_model, base_tok or tok, prompts, cfg.max_new_tokens)
    if cfg.judge.startswith(("http://", "https://")):
        judge = EndpointJudge(cfg.judge, cfg.judge_model, api_key=cfg.judge_api_key)
    else:
        judge = LocalJudge(*load(cfg.judge, dtype=dtype, device=str(next(model.parameters()).device)),
                           batch_size=cfg.batch_size)
    rep = judge_pairwise(judge, prompts, answers, baseline).to_dict()
    rep["examples"] = [{"prompt": p, "answer": a, "baseline": b} for p, a, b in zip(prompts[:3], answers, baseline)]
    return rep, prompts


RUNNERS = {"multiple_choice": _multiple_choice, "perplexity": _perplexity, "generation": _generation,
           "humaneval": _humaneval, "classification": _classification, "judge": _judge, "qa": _qa}


def headline_metrics(r: dict[str, Any]) -> dict[str, float]:
    """The numbers a task is judged by (for the table, the console and training logs)."""
    if "acc" in r:
        return {k: r[k] for k in ("acc", "acc_norm", "acc_norm_token")}
    if "bits_per_byte" in r:
        return {k: r[k] for k in ("bits_per_byte", "xz_bits_per_byte", "xz_per_document_bits_per_byte", "perplexity")
                if k in r}
    if "exact_match" in r:
        return {k: r[k] for k in ("exact_match", "f1") if k in r}
    if "pass@k" in r:
        return {f"pass@{k}": v for k, v in r["pass@k"].items()}
    if "win_rate" in r:
        return {k: r[k] for k in ("win_rate", "tie_rate", "loss_rate", "score")}
    if r.get("task") == "regress":
        return {k: r[k] for k in ("mse", "mae", "pearson", "spearman")}
    return {k: r[k] for k in ("accuracy", "macro_f1", "micro_f1")}


def uncertainty(r: dict[str, Any], metric: str) -> str:
    """"± stderr" of a headline metric, or its "95% CI [low, high]" (judge rates), or "" when it has neither."""
    if metric in ("win_rate", "tie_rate", "loss_rate", "score"):
        low, high = r[metric.removesuffix("_rate") + "_ci"]
        return f"95% CI [{low:.4f}, {high:.4f}]"
    if metric.startswith("pass@"):
        k = metric[5:]
        err = r["stderr"][k] if k in r["stderr"] else r["stderr"][int(k)]
    else:
        err = r.get(metric + "_stderr")
    return "" if err is None or err != err else f"± {err:.4f}"


def headline(r: dict[str, Any]) -> str:
    """A task's headline metrics on one line, for the console."""
    parts = [f"{metric} {value:.4f} {uncertainty(r, metric)}".rstrip() for metric, value in headline_metrics(r).items()]
    n = r.get("n", r.get("problems", r.get("documents", r.get("examples"))))
    return ", ".join(parts) + (f" (n={n})" if isinstance(n, int) else "")


def markdown(results: dict[str, dict[str, Any]]) -> str:
    """One row per task and metric: | task | metric | value | ± stderr or 95% CI |, plus each task's
    contamination share."""
    rows = ["| task | metric | value | uncertainty |", "| --- | --- | --- | --- |"]
    for name, r in results.items():
        for metric, value in headline_metrics(r).items():
            rows.append(f"| {name} | {metric} | {value:.4f} | {uncertainty(r, metric)} |")
        if "contamination" in r:
            c = r["contamination"]
            share = "n/a" if c["share"] is None else f"{c['share']:.4f}"
            rows.append(f"| {name} | contaminated ({c['ngram']}-gram) | {share} | |")
    return "\n".join(rows) + "\n"
