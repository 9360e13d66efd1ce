"""`lmforge finetune --config recipes/finetune/….yaml`: instruction SFT, classification / regression or extractive
question answering (a span head over SQuAD-format records) on a pretrained model, with full, freeze (top blocks),
LoRA, QLoRA, prompt-tuning or adapter methods — the same engine as pretraining, through an objective and a model
transform.

With a parameter-efficient method the frozen base is kept in the autocast dtype (bf16) while trainable weights
stay fp32; checkpoints hold only the trainable weights. Outputs in the run directory: `final/` (a model folder
for full / freeze / LoRA (merged); an adapter folder in the PEFT layout for prompt tuning and adapters, which
`lmforge.load` resolves through its base model), `adapter/` for LoRA / QLoRA, `eval.json`, `metrics.jsonl`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data.classify import ClassifyData
from ..data.examples import ReplaySection
from ..data.qa import QAData
from ..data.sft import SFTFormat
from ..engine.trainer import TrainConfig
from ..transforms.adapters import AdapterConfig
from ..transforms.lora import LoraConfig
from ..transforms.methods import FreezeSection, ModelSection
from ..transforms.prompt_tuning import PromptConfig

log = logging.getLogger(__name__)


@dataclass
class DataSection:
    """Fine-tuning data (JSONL / Parquet / CSV records; see docs/formats.md)."""

    train: list[str] = field(default_factory=list)
    """Training files, directories or globs (`{stdlib}` and `{pkg:NAME}` placeholders work)."""
    validation: list[str] = field(default_factory=list)
    """Validation files; empty = hold out validation_fraction of train."""
    validation_fraction: float = 0.05
    """Share of train held out for validation (a stable hash of each example) when no validation files."""
    format: SFTFormat = "auto"
    """SFT record format; auto detects messages, prompt/response, Alpaca and preference pairs (their chosen reply)
    per record."""
    max_length: int = 1024
    """Longest example in tokens; longer ones are cut (and counted)."""
    pack: bool = False
    """Pack several SFT examples into one row of max_length tokens (no attention across examples)."""
    system_prompt: str | None = None
    """System message added to prompt/response and Alpaca records."""
    train_end_of_turn: bool = True
    """Also train the assistant's end-of-turn token, so the model learns to stop."""
    classify: ClassifyData = field(default_factory=ClassifyData)
    """Fields of classification / regression records (task classify or regress)."""
    qa: QAData = field(default_factory=QAData)
    """Windows of question-answering records (task qa: SQuAD v1.1 / v2.0 JSON, or JSONL records)."""
    replay: ReplaySection = field(default_factory=ReplaySection)
    """Replay of pretraining data (task sft)."""

    def validate(self) -> None:
        if not self.train:
            raise ValueError("train: give at least one file of fine-tuning records")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), found {self.validation_fraction}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, found {self.max_length}")


@dataclass
class Config:
    run_dir: str = "runs/finetune"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/, eval.json."""
    task: Literal["sft", "classify", "regress", "qa"] = "sft"
    """Instruction tuning (loss on assistant tokens), classification (cross-entropy), regression (MSE) or
    extractive question answering (the answer's start and end tokens)."""
    method: Literal["full", "freeze", "lora", "qlora", "prompt", "adapter"] = "lora"
    """What trains: everything, the top blocks, LoRA, LoRA on an NF4 base, virtual tokens, or bottleneck adapters."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model."""
    data: DataSection = field(default_factory=DataSection)
    """The data."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, eval_at_start=True))
    """The engine."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA settings (method lora, qlora)."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """Prompt tuning settings (method prompt)."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """Bottleneck adapter settings (method adapter)."""
    freeze: FreezeSection = field(default_factory=FreezeSection)
    """Freeze settings (method freeze)."""
    save_merged: bool = True
    """LoRA / QLoRA: also write the merged model to final/ (the adapter alone goes to adapter/)."""

    def validate(self) -> None:
        if self.data.replay.shards and self.task != "sft":
            raise ValueError("data.replay works with task sft (replay is next-token loss on pretraining text)")
        if self.data.pack and (self.task != "sft" or self.method == "prompt"):
            raise ValueError("data.pack works with task sft and a method other than prompt")


# ---- the run


def main(cfg: Config) -> int:
    from ..data.readers import require_validation
    from ..engine import runs
    from . import _tune

    t = _tune.start(cfg)
    world, run, tok = t.world, t.run, t.tok
    train, val, collate, val_collate, objective, head, summary, scored = _task(cfg, tok)
    print(summary)
    require_validation(val, cfg.data)
    model, trainable, total = _tune.tuned_model(cfg, tok, **head)
    if world.main:
        print(f"finetune ({cfg.task}, {cfg.method}): {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.3f}%); {len(train):,} training "
              f"{'rows' if cfg.data.pack else 'windows' if cfg.task == 'qa' else 'examples'}, {len(val):,} validation")
    data, objective, evals = _replay(cfg, t, train, collate, objective)
    trainer = _tune.example_trainer(cfg, t, model, objective, train, val, collate, val_collate, data, evals)
    return runs.finish(trainer, "finetune", cfg, lambda _: _save(cfg, model, tok, run), _summary, trainable, total,
                       result=lambda last: _final_eval(cfg, trainer, last, model, val, val_collate, scored),
                       title=f"finetune ({cfg.task}, {cfg.method})", task=cfg.task, method=cfg.method)


def _task(cfg: Config, tok) -> tuple[Any, ...]:
    """(train, validation, collate, validation collate, objective, head settings, a log line, what the final
    evaluation scores: label names, or the validation QA examples) of cfg.task."""
    from ..data.classify import load_classification_data
    from ..data.sft import load_sft_data
    from ..objectives.causal_lm import CausalLM

    if cfg.task == "sft":
        train, val, collate, val_collate, summary = load_sft_data(cfg.data, tok, cfg.train.seed)
        return train, val, collate, val_collate, CausalLM(), {}, summary, None
    if cfg.task == "qa":
        from ..data.qa import load_qa_data
        from ..objectives.span import SpanExtraction

        train, val_examples, val, collate, summary = load_qa_data(cfg.data, tok, cfg.train.seed)
        return train, val, collate, collate, SpanExtraction(), {"head": "span"}, summary, val_examples
    from ..objectives.classify import Classification

    train, val, collate, label2id, summary = load_classification_data(cfg.data, cfg.task, tok, cfg.train.seed)
    num_labels = 1 if cfg.task == "regress" else len(label2id)
    id2label = None if cfg.task == "regress" else {i: lab for lab, i in label2id.items()}
    head = {"head": "classifier", "num_labels": num_labels, "id2label": id2label}
    return train, val, collate, collate, Classification(cfg.task, num_labels), head, summary, id2label


def _replay(cfg: Config, t, train, collate, objective):
    """(batch source or None, objective, extra validation sets) with data.replay: pretraining sequences mixed into
    each micro batch (fraction > 0, their loss added) and the pretraining validation loss measured (any shards)."""
    from ..data.examples import ExampleLoader, ReplayMix
    from ..data.loader import PackedLoader, SourceSpec, eval_batches
    from ..data.shards import read_index
    from ..engine.trainer import EvalSet
    from ..objectives.causal_lm import WithReplay

    rep, mb, seed, world = cfg.data.replay, cfg.train.micro_batch, cfg.train.seed, t.world
    if not rep.shards:
        return None, objective, []
    sources = [SourceSpec(p) for p in rep.shards]
    for s in sources:
        fp = read_index(s.path)["tokenizer"]["fingerprint"]
        if fp != t.tok.fingerprint():
            raise ValueError(f"data.replay.shards {s.path} were tokenized with another tokenizer (fingerprint {fp}, "
                             f"the model's is {t.tok.fingerprint()}); run `lmforge prepare` with this model's "
                             f"tokenizer")
    data = None
    if rep.fraction > 0:
        examples = ExampleLoader(train, mb, collate, seed=seed, rank=world.data_rank, world=world.data_world)
        replay = PackedLoader(sources, rep.seq_len, max(1, round(rep.fraction * mb)), seed=seed, rank=world.data_rank,
                              world=world.data_world)
        data = ReplayMix(examples, replay)
        objective = WithReplay(objective, rep.weight)
    evals = [EvalSet("pretrain", lambda: eval_batches(sources[:1], rep.seq_len, mb, max_batches=cfg.train.eval_batches,
                                                      rank=world.data_rank, world=world.data_world, seed=seed))]
    return data, objective, evals


def _final_eval(cfg: Config, trainer, last: dict[str, Any], model, val, collate, scored) -> dict[str, Any]:
    """eval.json: the last validation metrics, the forgetting measurement and the task's full report
    (classification: per class; regression: correlations; QA: exact match and F1 of the decoded answers)."""
    from ..engine.runs import eval_summary

    out = eval_summary(trainer, last)
    start = out.get("before", {})  # step 0's validation metrics, read back from metrics.jsonl after a resume
    if "val_pretrain_loss" in start and "val_pretrain_loss" in last:
        out["forgetting"] = {"pretrain_loss_before": start["val_pretrain_loss"],
                             "pretrain_loss_after": last["val_pretrain_loss"],
                             "rise": last["val_pretrain_loss"] - start["val_pretrain_loss"]}
    if cfg.task == "qa":
        from ..data.examples import fixed_batches
        from ..eval.qa import format_qa_report, qa_report
        from ..objectives.span import decode_answers, span_logits

        with trainer.autocast():
            starts, ends = span_logits(model, fixed_batches(val, cfg.train.micro_batch, collate))
        out["report"] = qa_report(scored, decode_answers(scored, val, starts, ends, **cfg.data.qa.decoding()))
        print(format_qa_report(out["report"]))
    elif cfg.task != "sft":
        from ..data.examples import fixed_batches
        from ..eval.classification import classification_report, format_report, regression_report

        id2label = scored
        with trainer.autocast():
            preds, targets = trainer.objective.predict(model, fixed_batches(val, cfg.train.micro_batch, collate))
        if cfg.task == "classify":
            out["report"] = classification_report(preds, targets, id2label)
        else:
            out["report"] = regression_report(preds, targets)
        print(format_report(out["report"]))
    return out


def _save(cfg: Config, model, tok, run: Path) -> Path:
    """Write the result (see the module docstring); returns final/."""
    from ..transforms.methods import save_trained

    return save_trained(model, tok, run, cfg.method, cfg.model.init_from, save_merged=cfg.save_merged,
                        prompt=cfg.prompt, adapter=cfg.adapter)


def _summary(result: dict[str, Any]) -> str:
    parts = [f"{k} {v:.4g}" for k, v in result.items() if k.startswith("val_") and isinstance(v, float)
             and k.endswith(("loss", "accuracy", "ppl"))]
    if "forgetting" in result:
        f = result["forgetting"]
        parts.append(f"pretrain loss {f['pretrain_loss_before']:.4f} -> {f['pretrain_loss_after']:.4f}")
    if "report" in result and "macro_f1" in result["report"]:
        parts.append(f"macro-F1 {result['report']['macro_f1']:.4f}")
    if "report" in result and "exact_match" in result["report"]:
        parts.append(f"exact match {result['report']['exact_match']:.4f}, F1 {result['report']['f1']:.4f}")
    return ", ".join(parts)
