"""`lmforge distill --config …` (or `lmforge distill TEACHER student=… data.train=[…]`): knowledge distillation of a
frozen teacher into a smaller student with its tokenizer, on the one engine (objectives/distill.py: forward KL mixed
with hard-label CE by alpha, reverse KL, GKD's JSD; `on_policy` = λ: that fraction of micro batches continued by the
student and scored by the teacher). task lm: token shards read as pretraining reads them; task classify: labelled
records read as classification fine-tuning reads them, the teacher a classifier. The student is a preset built with
the teacher's vocabulary, or a model folder (e.g. a pruned teacher). A training run directory (exact resume,
eval.json, final/); final/compress.json has the teacher as "before", the student as "after"."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from ..data.classify import ClassifyData
from ..engine.trainer import TrainConfig
from ..eval.compression import CompressEval

POSITIONAL = ("teacher",)


@dataclass
class DataSection:
    """What the student learns on."""

    train: list[str] = field(default_factory=list)
    """task lm: token-shard directories written by `lmforge prepare` with the teacher's tokenizer (several form a
    mixture); task classify: files, directories or globs of {"text", "label"} records."""
    weights: list[float] | None = None
    """task lm: mixture weights, one per directory (default: equal)."""
    seq_len: int = 256
    """task lm: tokens per training sequence."""
    validation: list[str] = field(default_factory=list)
    """task classify: validation files; empty = hold out validation_fraction of train."""
    validation_fraction: float = 0.1
    """task classify: share of train held out for validation (a stable hash of each text)."""
    classify: ClassifyData = field(default_factory=ClassifyData)
    """task classify: fields of the records (text_field, label_field, drop_labels, max_length ...)."""

    def validate(self) -> None:
        if not self.train:
            raise ValueError("train: give token-shard directories (task lm) or labelled record files (task classify)")
        if self.weights is not None and len(self.weights) != len(self.train):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.train)} train directories")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, found {self.seq_len}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), found {self.validation_fraction}")


@dataclass
class Config:
    teacher: str
    """The teacher: any model lmforge.load reads (folder, .gguf, alias such as smollm2-135m-instruct, hub id)."""
    student: str = "llama-7m"
    """A preset name (built with the teacher's vocabulary, seeded by train.seed) or a model folder (e.g. pruned)."""
    student_overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields set over the student preset (e.g. num_layers: 2)."""
    task: Literal["lm", "classify"] = "lm"
    """Next-token distributions of causal LMs, or class distributions of classifiers."""
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """forward_kl: T²·KL(p_t‖p_s) (Hinton); reverse_kl: T²·KL(p_s‖p_t) (MiniLLM); jsd: GKD's generalised JSD."""
    temperature: float = 2.0
    """Softmax temperature of both distributions; the divergence is scaled by T²."""
    alpha: float = 0.5
    """L = alpha · divergence + (1 − alpha) · cross-entropy on the data's labels (0: plain CE, no teacher pass)."""
    beta: float = 0.5
    """jsd: weight of the teacher's side, m = beta·p_t + (1 − beta)·p_s (0: forward KL, 1: reverse KL)."""
    on_policy: float = 0.0
    """task lm: fraction λ of micro batches whose continuations the student samples (GKD); the divergence alone
    is their loss."""
    on_policy_prompt: int = 32
    """On-policy batches: tokens of each training window kept as the prompt."""
    on_policy_tokens: int = 64
    """On-policy batches: tokens the student samples after each prompt (fewer when it ends its text)."""
    on_policy_temperature: float = 1.0
    """On-policy batches: sampling temperature of the student (0: greedy)."""
    teacher_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype the teacher runs (and is measured) in."""
    run_dir: str = "runs/distill"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/ (the student, with compress.json), eval.json."""
    data: DataSection = field(default_factory=DataSection)
    """The data."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=500))
    """The engine."""
    eval: CompressEval = field(default_factory=CompressEval)
    """What final/compress.json measures of the teacher and the student (task classify: classification tasks only,
    plus validation accuracy)."""

    def validate(self) -> None:
        from ..objectives.distill import DistillSpec

        DistillSpec(self.loss, self.temperature, self.alpha, self.beta).validate()
        if not 0 <= self.on_policy <= 1 or (self.on_policy and self.task != "lm"):
            raise ValueError(f"on_policy {self.on_policy} needs task lm (the student samples text) and a fraction in "
                             f"[0, 1]; found task {self.task!r}")
        if (self.on_policy and not 1 <= self.on_policy_prompt < self.data.seq_len) or self.on_policy_tokens < 1 \
                or self.on_policy_temperature < 0:
            raise ValueError(f"expected 1 <= on_policy_prompt < data.seq_len ({self.data.seq_len}), on_policy_tokens "
                             f">= 1, on_policy_temperature >= 0; found {self.on_policy_prompt}, "
                             f"{self.on_policy_tokens}, {self.on_policy_temperature}")
        if self.student_overrides and not _is_preset(self.student):
            raise ValueError(f"student_overrides apply to a preset student; {self.student!r} is a model")

    @property
    def model(self) -> SimpleNamespace:
        """The run's parent model for the lineage record: a student folder (None for a fresh preset)."""
        return SimpleNamespace(init_from=None if _is_preset(self.student) else self.student)


def _is_preset(name: str) -> bool:
    from ..models.presets import PRESETS

    return name in PRESETS


def main(cfg: Config) -> int:
    import torch

    from ..engine import runs
    from ..engine.trainer import Trainer
    from ..eval.runners import training_evaluators
    from ..models.loading import instantiate, save
    from ..objectives.distill import Distillation, OnPolicyMix, build_student
    from ..transforms import count_parameters
    from ..transforms.peft import load
    from . import _tune
    from .pretrain import token_batches

    world, run = runs.start(cfg)
    teacher, tok = load(cfg.teacher, dtype=getattr(torch, cfg.teacher_dtype))
    head = "lm" if cfg.task == "lm" else "classifier"
    if tok is None or teacher.cfg.head != head:
        raise ValueError(f"teacher {cfg.teacher}: found head {teacher.cfg.head!r}{'' if tok else ' and no tokenizer'};"
                         f" task {cfg.task} needs a {head!r} model with its tokenizer"
                         + (" (train one with `lmforge finetune task=classify`)" if cfg.task == "classify" else ""))
    kw = dict(seed=cfg.train.seed, overrides=cfg.student_overrides,
              positions=max(cfg.data.seq_len, cfg.data.classify.max_length))
    objective = Distillation(teacher, cfg.loss, cfg.temperature, cfg.alpha, cfg.beta,
                             prompt_tokens=cfg.on_policy_prompt, new_tokens=cfg.on_policy_tokens,
                             sample_temperature=cfg.on_policy_temperature)
    if cfg.task == "lm":
        _check_shards(cfg, tok)
        student = build_student(cfg.student, teacher, tok, head="lm", **kw)
        loader, evals = token_batches(cfg, world)
        data = OnPolicyMix(loader, cfg.on_policy, cfg.train.seed) if cfg.on_policy else loader
        trainer = Trainer(student, objective, data, cfg.train, run, evals, world,
                          evaluators=training_evaluators(cfg.train, tok))
        val = collate = None
    else:
        train, val, collate, label2id = _classification_data(cfg, teacher, tok)
        student = build_student(cfg.student, teacher, tok, head="classifier", num_labels=len(label2id),
                                id2label={i: name for name, i in label2id.items()}, **kw)
        trainer = _tune.example_trainer(cfg, _tune.Tuning(world, run, tok), student, objective, train, val, collate)
    if world.main:
        print(f"distill ({cfg.task}, {cfg.loss}, T={cfg.temperature}, alpha={cfg.alpha}"
              f"{f', on-policy {cfg.on_policy}' if cfg.on_policy else ''}): teacher {teacher.num_parameters():,}"
              f" parameters -> student {student.num_parameters():,}")

    def save_final(full: dict[str, Any] | None) -> Path:
        return save(instantiate(student.cfg, full if full is not None else trainer.export_state_dict()), tok,
                    run / "final")

    def result(last: dict[str, Any]) -> dict[str, Any]:
        out = runs.eval_summary(trainer, last)
        bpt = trainer.eval_sets[0].bytes_per_token if trainer.eval_sets else None
        if "val_ce" in out and bpt:  # the student's held-out bits per byte on the shards' validation split
            out["val_bpb"] = out["val_ce"] / 0.6931471805599453 / bpt
        return out

    def summary(res: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.4g}" for k, v in res.items() if k.startswith("val_") and isinstance(v, float))

    code = runs.finish(trainer, "distill", cfg, save_final, summary, *count_parameters(student), result=result,
                       title=f"distill ({cfg.task}, {cfg.loss})", teacher=cfg.teacher, student=cfg.student)
    if code == 0 and world.main:
        _compress_report(cfg, teacher, tok, run / "final", val, collate)
    return code


def _check_shards(cfg: Config, tok) -> None:
    """The shards must be tokenized with the teacher's tokenizer (the student shares it)."""
    from ..data.readers import DataError
    from ..data.shards import read_index

    for path in cfg.data.train:
        fp = read_index(path)["tokenizer"]["fingerprint"]
        if fp != tok.fingerprint():
            raise DataError(f"data.train {path} was tokenized with another tokenizer (fingerprint {fp}, the teacher's "
                            f"is {tok.fingerprint()}); run `lmforge prepare tokenizer={cfg.teacher}`")


def _classification_data(cfg: Config, teacher, tok):
    """(train, validation, collate, label -> id) with label ids in the teacher's output order."""
    from ..data.classify import load_classification_data

    names = teacher.cfg.id2label
    d = cfg.data
    if names and d.classify.labels is None:  # the teacher's own label order, so class i means the same to both
        d = replace(d, classify=replace(d.classify, labels=[names[i] for i in range(len(names))]))
    train, val, collate, label2id, summary = load_classification_data(d, "classify", tok, cfg.train.seed)
    if names and sorted(names.values()) != sorted(label2id):
        raise ValueError(f"teacher labels {sorted(names.values())} differ from the data's {sorted(label2id)}")
    if len(label2id) != teacher.cfg.num_labels:
        raise ValueError(f"the data has {len(label2id)} classes, the teacher {teacher.cfg.num_labels} outputs")
    print(summary)
    return train, val, collate, label2id


def _compress_report(cfg: Config, teacher, tok, final: Path, val, collate) -> None:
    """final/compress.json: the teacher before, the student (reloaded from final/) after."""
    import torch

    from ..eval.compression import compare_table, measure, write_report
    from ..eval.tasks import parse_task
    from ..models.loading import resolve
    from ..transforms.peft import load

    student, _ = load(final, dtype=torch.float32)
    ev = cfg.eval
    if cfg.task == "classify":  # language-model tasks do not apply to classifiers
        ev = replace(ev, tasks=[t for t in ev.tasks if parse_task(t).kind == "classification"])
    try:
        teacher_path: Path | None = resolve(cfg.teacher)
    except (OSError, ValueError):
        teacher_path = None
    before, after = ({**measure(m, tok, ev, path), "float32_bytes": 4 * m.num_parameters()}
                     for m, path in ((teacher, teacher_path), (student, final)))
    if cfg.task == "classify" and ev.enabled:
        before["validation"], after["validation"] = (_accuracy(m, val, collate, cfg.train.micro_batch)
                                                     for m in (teacher, student))
    extra = {"teacher": cfg.teacher, "student": cfg.student, "teacher_parameters": teacher.num_parameters(),
             "student_parameters": student.num_parameters()}
    report = write_report(final, "distill", cfg, before, after, extra)
    print(compare_table(before, after))
    print(f"wrote {report}")


def _accuracy(model, val, collate, micro_batch: int) -> dict[str, float]:
    """Accuracy and macro-F1 of a classifier on the validation examples."""
    from ..data.examples import fixed_batches
    from ..eval.classification import classification_report
    from ..objectives.classify import Classification

    batches = fixed_batches(val, micro_batch, collate)
    preds, targets = Classification("classify", model.cfg.num_labels).predict(model, batches)
    rep = classification_report(preds, targets, model.cfg.id2label)
    return {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"], "examples": rep["examples"]}
