"""What the stages that tune a pretrained model share (finetune, dpo, reward; ppo and grpo through `_rl.py`): the
run with its tokenizer, the model with the method's transform (seeded, counted), and a trainer over shuffled
in-memory examples with a fixed validation set. The end of the run is `engine.runs.finish`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

TRANSFORM_SECTIONS = ("lora", "prompt", "adapter", "freeze")
"""Config sections `transforms.methods.build_model` takes, passed on when a stage's config has them."""


@dataclass
class Tuning:
    """A tuning run: its process group, run directory and the tokenizer of the model it starts from."""

    world: Any
    run: Path
    tok: Any


def start(cfg) -> Tuning:
    """`runs.start` (process group, config.yaml) and the tokenizer of cfg.model.init_from."""
    from ..engine import runs
    from ..models.loading import load_tokenizer

    world, run = runs.start(cfg)
    return Tuning(world, run, load_tokenizer(cfg.model.init_from))


def tuned_model(cfg, tok, **head: Any) -> tuple[Any, int, int]:
    """(model, trainable, total parameters): cfg.model.init_from with cfg.method's transform, built after seeding
    torch with cfg.train.seed (new heads and adapters start the same on every run); `head` adds head, num_labels,
    id2label."""
    import torch

    from ..transforms import count_parameters
    from ..transforms.methods import build_model

    torch.manual_seed(cfg.train.seed)
    sections = {k: getattr(cfg, k) for k in TRANSFORM_SECTIONS if hasattr(cfg, k)}
    model = build_model(cfg.model.init_from, cfg.method, tok=tok, precision=cfg.train.precision,
                        random_init=cfg.model.random_init, **sections, **head)
    return (model, *count_parameters(model))


def example_trainer(cfg, t: Tuning, model, objective, train: Sequence[Any], val: Sequence[Any], collate,
                    val_collate=None, data: Any = None, evals: Sequence[Any] = ()):
    """A Trainer over `train` in shuffled micro batches (or `data`, a batch source built on them), validated on the
    fixed batches of `val` (then `evals`), with cfg.train.eval_tasks as evaluators."""
    from ..data.examples import ExampleLoader, fixed_batches
    from ..engine.trainer import EvalSet, Trainer
    from ..eval.runners import training_evaluators

    mb, world = cfg.train.micro_batch, t.world
    if data is None:
        data = ExampleLoader(train, mb, collate, seed=cfg.train.seed, rank=world.data_rank, world=world.data_world)
    validation = EvalSet("validation", lambda: fixed_batches(
        val, mb, val_collate or collate, rank=world.data_rank, world=world.data_world,
        max_batches=cfg.train.eval_batches))
    return Trainer(model, objective, data, cfg.train, t.run, [validation, *evals], world,
                   evaluators=training_evaluators(cfg.train, t.tok))
