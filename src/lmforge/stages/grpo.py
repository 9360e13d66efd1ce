"""`lmforge grpo --config recipes/align/grpo-smollm2.yaml`: GRPO (Shao et al. 2024, "DeepSeekMath") with verifiable
rewards — G completions per prompt sampled from the model being trained, rewards from plain Python functions,
advantages normalised within each group, the clipped objective with a k3 KL penalty to the reference — on the one
engine: `GRPOObjective` + the `GRPOBatches` rollout source + `Trainer.fit()`.

`train.steps` counts optimizer steps; a generation round of prompts_per_round x group_size rollouts serves
rollouts / (micro_batch x grad_accum) x num_iterations of them. The reference is the model with its LoRA adapters
disabled (method lora: no second copy) or a frozen copy (method full; none when beta is 0). Held-out evaluation:
the mean reward of greedy answers to the validation prompts, before training (eval_at_start) and after, as
`val_reward` in metrics.jsonl and eval.json. Outputs as finetune: adapter/ (LoRA), final/, eval.json,
lmforge.json, metrics.jsonl, checkpoints/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from ..data.prompts import PromptData
from ..engine.trainer import TrainConfig
from ..rl.rewards import RewardSpec
from ..rl.rollouts import SamplingConfig
from ..transforms.lora import LoraConfig
from ..transforms.methods import ModelSection

log = logging.getLogger(__name__)


@dataclass
class Config:
    run_dir: str = "runs/grpo"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, adapter/, final/, eval.json."""
    method: Literal["lora", "full"] = "lora"
    """What trains: LoRA adapters (the reference is the base, no copy) or every weight (a frozen copy is kept)."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model."""
    data: PromptData = field(default_factory=PromptData)
    """The prompts."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    """Reward functions (name, weight, options); their weighted sum is the reward."""
    group_size: int = 8
    """Completions sampled per prompt (G); advantages compare them."""
    prompts_per_round: int = 8
    """Prompts per generation round (per process); the round has prompts_per_round x group_size rollouts."""
    num_iterations: int = 1
    """Passes over each round's rollouts before sampling again (mu of the GRPO paper)."""
    beta: float = 0.04
    """Weight of the k3 KL penalty to the reference (0 = none, and no reference pass)."""
    clip_eps: float = 0.2
    """Clipping of the probability ratio: [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = None
    """Upper clip (DAPO's clip-higher); null = clip_eps."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"
    """Token aggregation: per-sequence mean then mean (paper), one token mean (bnpo), or sum / max length (dr_grpo)."""
    scale_rewards: Literal["std", "batch", "none"] = "std"
    """Advantage scale: the group's reward std (paper), the batch's, or none (Dr. GRPO)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Sampling of the completions (the held-out evaluation decodes greedily with the same length and stops)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, log_every=1, eval_at_start=True,
                                                                   eval_every=50))
    """The engine; steps are optimizer steps."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings (method lora)."""
    save_merged: bool = True
    """LoRA: also write the merged model to final/ (the adapter alone goes to adapter/)."""

    def validate(self) -> None:
        if self.group_size < 2 or self.prompts_per_round < 1 or self.num_iterations < 1:
            raise ValueError(f"group_size must be >= 2, prompts_per_round and num_iterations >= 1; found "
                             f"{self.group_size}, {self.prompts_per_round}, {self.num_iterations}")
        rows, step = self.prompts_per_round * self.group_size, self.train.micro_batch * self.train.grad_accum
        if rows % step:
            raise ValueError(f"a round of prompts_per_round x group_size = {rows} rollouts must fill whole optimizer "
                             f"steps of train.micro_batch x train.grad_accum = {step} rows")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, found {self.beta}")
        if self.train.parallel.dp == "fsdp" or self.train.parallel.tp > 1:
            raise ValueError("train.parallel: grpo samples with the whole model on each process; use ddp")


def main(cfg: Config) -> int:
    from functools import partial

    from ..engine.trainer import Trainer
    from ..objectives.rl import GRPOObjective
    from ..precision import autocast
    from ..rl.batches import GRPOBatches
    from . import _rl

    r = _rl.start(cfg, reference=cfg.beta > 0)
    t, world = cfg.train, r.world
    per_round = cfg.prompts_per_round * cfg.group_size // (t.micro_batch * t.grad_accum) * cfg.num_iterations
    if world.main:
        print(f"grpo ({cfg.method}): {r.trainable:,} trainable of {r.total:,} parameters; {len(r.train_ids):,} "
              f"training prompts, {len(r.val_ids):,} held out; rounds of {cfg.prompts_per_round} prompts x "
              f"{cfg.group_size} completions, {per_round} optimizer steps each")
    data = GRPOBatches(r.model, r.tok, r.train_ids, r.train_records, r.rewards, group_size=cfg.group_size,
                       prompts_per_round=cfg.prompts_per_round, num_iterations=cfg.num_iterations,
                       micro_batch=t.micro_batch, grad_accum=t.grad_accum, sampling=cfg.sampling, beta=cfg.beta,
                       scale_rewards=cfg.scale_rewards, seed=t.seed, rank=world.data_rank, world=world.data_world,
                       autocast=partial(autocast, t.precision, world.device), ref_model=r.ref_model)
    objective = GRPOObjective(cfg.beta, cfg.clip_eps, cfg.clip_eps_high, cfg.loss_type, cfg.sampling.temperature,
                              cfg.sampling.max_new_tokens, ref_model=r.ref_model)
    trainer = Trainer(r.model, objective, data, t, r.run, [], world, evaluators=r.evaluators(cfg))
    return _rl.finish("grpo", cfg, r, trainer, data)
