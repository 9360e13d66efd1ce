"""`lmforge tune --config recipes/tune/….yaml`: search hyperparameters of any training verb with Optuna (Akiba et
al. 2019): TPE or random sampling over dotted config keys, median or Hyperband (Li et al. 2018) pruning on the
validation metric the engine reports at each evaluation. Each trial is a normal run in RUN_DIR/trial-NNNN.

Several workers (the same command started again, here or on machines that share the storage) run one study
together: a journal file by default (RUN_DIR/study.journal; Optuna advises against SQLite for parallel workers), or
a database URL. They run exactly `trials` trials between them. Ctrl-C exits 130 with the trial's checkpoint
saved; re-running continues the study and the trial. At the end each worker writes RUN_DIR/tune.json and
RUN_DIR/best.yaml (the base config with the best values, ready for `lmforge VERB --config RUN_DIR/best.yaml`).
See docs/scaling.md.
"""

from __future__ import annotations

import difflib
import importlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

TRAINING_VERBS = ("pretrain", "finetune", "reward", "dpo", "ppo", "grpo", "distill")
"""Verbs that train through the engine (whose evaluations the pruner sees)."""


@dataclass
class SpaceParam:
    """One dimension of the search space."""

    type: Literal["float", "int", "categorical"] = "float"
    """float or int range (low..high, optionally log-uniform or stepped), or categorical choices."""
    low: float | None = None
    """Lowest value (float, int)."""
    high: float | None = None
    """Highest value (float, int)."""
    log: bool = False
    """Sample uniformly in log space (learning rates, weight decay); needs low > 0."""
    step: float | None = None
    """Grid step of a range (an int range steps by 1 by default)."""
    choices: list[Any] | None = None
    """Values of a categorical dimension (numbers, strings, booleans, null)."""

    def validate(self) -> None:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("choices: a categorical dimension needs a non-empty list of choices")
            bad = [c for c in self.choices if c is not None and not isinstance(c, (bool, int, float, str))]
            if bad:
                raise ValueError(f"choices: expected numbers, strings, booleans or null, found {bad[0]!r}")
            return
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} dimension needs low and high, found low={self.low} high={self.high}")
        if not self.low <= self.high:
            raise ValueError(f"low: expected low <= high, found low={self.low} high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"low: a log-uniform range needs low > 0, found {self.low}")
        if self.log and self.step is not None:
            raise ValueError("step: a range is either stepped or log-uniform, not both")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step: expected a number > 0, found {self.step}")
        if self.type == "int" and any(v is not None and float(v) != int(v) for v in (self.low, self.high, self.step)):
            raise ValueError(f"an int dimension needs whole numbers, found low={self.low} high={self.high} "
                             f"step={self.step}")


@dataclass
class Config:
    base: str = ""
    """The verb's YAML config every trial starts from (e.g. recipes/pretrain/tiny.yaml)."""
    verb: str = "pretrain"
    """The training verb to tune: pretrain, finetune, reward, dpo, ppo, grpo, distill."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted keys of the verb's config set in every trial (e.g. train.steps: 200), over the base."""
    space: dict[str, SpaceParam] = field(default_factory=dict)
    """Dotted key of the verb's config -> {type, low, high, log, step, choices} (set in the YAML file)."""
    trials: int = 20
    """Trials of the study, all workers together (pruned and diverged ones count)."""
    metric: str = "val_loss"
    """The evaluation metric reported to the pruner and optimised (val_loss, val_bpb, task/...)."""
    direction: Literal["minimize", "maximize"] = "minimize"
    """Whether lower (losses) or higher (accuracies) is better."""
    sampler: Literal["tpe", "random"] = "tpe"
    """TPE (Bergstra et al. 2011, Optuna's default) or uniform random sampling."""
    seed: int = 0
    """Seed of the sampler (a single worker's study is then reproducible)."""
    startup_trials: int = 5
    """TPE: trials sampled at random before the model of good and bad values takes over."""
    pruner: Literal["median", "hyperband", "none"] = "median"
    """Stop trials early: worse than the median of earlier trials at the same step, Hyperband, or never."""
    pruner_startup_trials: int = 3
    """median: trials that run to the end before any is pruned."""
    warmup_steps: int = 0
    """median: no pruning before this training step."""
    min_resource: int | None = None
    """hyperband: the fewest training steps a trial gets (default: the verb's train.eval_every, or 1)."""
    reduction_factor: int = 3
    """hyperband: 1/reduction_factor of the trials go on at each rung."""
    storage: str = ""
    """Journal file shared by the workers (default RUN_DIR/study.journal), or a database URL
    (postgresql://user:pass@host/db) for workers on several machines."""
    study: str = ""
    """Study name in the storage (default: the run directory's name)."""
    run_dir: str = "runs/tune"
    """Folder of the study: trial-NNNN/ runs, study.journal, tune.json, best.yaml."""

    def validate(self) -> None:
        if not self.base:
            raise ValueError("base: expected the verb's YAML config every trial starts from")
        for name in ("trials", "reduction_factor"):
            least = 2 if name == "reduction_factor" else 1
            if getattr(self, name) < least:
                raise ValueError(f"{name}: expected an integer >= {least}, found {getattr(self, name)}")
        for name in ("startup_trials", "pruner_startup_trials", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0, found {getattr(self, name)}")
        if self.min_resource is not None and self.min_resource < 1:
            raise ValueError(f"min_resource: expected an integer >= 1, found {self.min_resource}")
        if not self.space:
            raise ValueError("space: expected at least one dotted key to search, e.g. train.optimizer.lr: "
                             "{type: float, low: 1.0e-4, high: 3.0e-2, log: true}")
        cls = verb_stage(self.verb).Config
        for section, keys in (("space", self.space), ("overrides", self.overrides)):
            for key in keys:
                check_key(cls, self.verb, section, key, self.space.get(key) if section == "space" else None)


def verb_stage(verb: str):
    """The stage module of a training verb; ValueError naming the verbs that can be tuned."""
    name = verb.replace("-", "_")
    if name not in TRAINING_VERBS:
        near = difflib.get_close_matches(name, TRAINING_VERBS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ValueError(f"verb: found {verb!r}, expected a verb that trains: {', '.join(TRAINING_VERBS)}{hint}")
    return importlib.import_module(f"lmforge.stages.{name}")


def check_key(cls: type, verb: str, section: str, key: str, param: SpaceParam | None) -> None:
    """ValueError unless `key` is a key of the verb's config (naming the nearest ones) that a value of `param`'s
    type can set."""
    from ..config import ConfigError, key_type

    if key == "run_dir":
        raise ValueError(f"{section}: run_dir is set by tune (RUN_DIR/trial-NNNN); remove it")
    try:
        tp = key_type(cls, key, f"of the {verb} config")
    except ConfigError as e:
        raise ValueError(f"{section}: {e}") from None
    kinds = set(get_args(tp)) | {tp}
    if param is not None and param.type == "float" and int in kinds and float not in kinds:
        raise ValueError(f"{section}: {key} is an integer field, found a float range; expected type: int")


def main(cfg: Config) -> int:
    """Run this worker's share of the study (until it holds `trials` trials), then write tune.json and best.yaml
    and print the table; 130 when Ctrl-C stopped it."""
    from ..atomic import write_text
    from ..config import ConfigError, save_config
    from ..engine.trainer import NonFiniteLossError
    from . import _search as S
    from . import _trial as T

    optuna = S.import_optuna()
    stage = verb_stage(cfg.verb)
    run = Path(cfg.run_dir)
    best_dir = run / "best"
    base = S.verb_config(stage, cfg.base, cfg.overrides, best_dir)  # fails now, not in every trial
    save_config(cfg, run / "config.yaml")
    storage = S.open_storage(cfg.storage, run)
    name = cfg.study or run.name
    study = optuna.create_study(study_name=name, storage=storage, direction=cfg.direction, load_if_exists=True,
                                pruner=make_pruner(cfg, base), sampler=make_sampler(cfg, 0))
    if study.direction.name.lower() != cfg.direction:
        raise ConfigError(f"direction: study {name!r} in {S.storage_name(cfg.storage, run)} was created to "
                          f"{study.direction.name.lower()}, found {cfg.direction}; expected the same direction "
                          f"(or another study name)")
    plan = T.TrialPlan(stage, cfg.base, dict(cfg.overrides), dict(cfg.space), cfg.metric, run, cfg.trials,
                       report=lambda line: print(f"tune: {line}", flush=True),
                       sampler=lambda number: make_sampler(cfg, number))
    run_trial = T.objective(plan)
    code = 0
    try:
        while not S.reap(study, run, cfg.trials).finished(cfg.trials):
            study.optimize(run_trial, n_trials=1, catch=(NonFiniteLossError, S.Surplus), gc_after_trial=True)
    except KeyboardInterrupt:
        print(f"tune: interrupted; the trial's checkpoint is saved: re-run the same command to continue the study "
              f"({S.storage_name(cfg.storage, run)})", flush=True)
        code = 130
    book = S.ledger(study.get_trials(deepcopy=False))
    record = {**T.summary(study, book, cfg.trials, cfg.metric, cfg.direction),
              "verb": cfg.verb, "base": cfg.base, "storage": S.storage_name(cfg.storage, run)}
    if record["best"] is not None:
        best = S.verb_config(stage, cfg.base, {**cfg.overrides, **record["best"]["params"]}, best_dir)
        save_config(best, run / "best.yaml")
        record["best_config"] = str(run / "best.yaml")
    write_text(run / "tune.json", json.dumps(record, indent=2, default=str) + "\n")
    counts = record["counts"]
    print(f"tune: study {name}: {len(record['trials'])}/{cfg.trials} trials: {counts['complete']} complete, "
          f"{counts['pruned']} pruned, {counts['fail']} diverged" +
          (f", {counts['running']} running" if counts["running"] else ""))
    for line in T.table(record):
        print("  " + line)
    if record["best"] is not None:
        b = record["best"]
        print(f"tune: best trial {b['number']}: {cfg.metric} {b['value']:.4g}; "
              f"run it: lmforge {cfg.verb} --config {run / 'best.yaml'}")
    return code


def make_sampler(cfg: Config, salt: int):
    """TPE (with the constant liar: running trials count as bad ones, so parallel workers spread out) or random,
    seeded by `seed + salt` (salt: the trial's number)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cfg.sampler == "random":
            return optuna.samplers.RandomSampler(seed=cfg.seed + salt)
        return optuna.samplers.TPESampler(seed=cfg.seed + salt, n_startup_trials=cfg.startup_trials,
                                          constant_liar=True)


def make_pruner(cfg: Config, base):
    """Median (Optuna's MedianPruner), Hyperband (brackets of budgets from min_resource up to train.steps) or
    none. Steps are the engine's training steps."""
    import optuna

    if cfg.pruner == "none":
        return optuna.pruners.NopPruner()
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials,
                                           n_warmup_steps=cfg.warmup_steps)
    train = getattr(base, "train", None)
    first = cfg.min_resource or max(1, getattr(train, "eval_every", 0) or 1)
    last = "auto" if "train.steps" in cfg.space or train is None else max(train.steps, first)
    return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=last,
                                          reduction_factor=cfg.reduction_factor)


__all__ = ["TRAINING_VERBS", "Config", "SpaceParam", "check_key", "main", "verb_stage"]
