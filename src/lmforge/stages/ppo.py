"""`lmforge ppo --config recipes/align/ppo-smollm2.yaml`: RLHF with PPO (Schulman et al. 2017; Ziegler et al. 2019;
Ouyang et al. 2022) — completions sampled by the inference engine from the policy being trained, scored by a
reward model (`reward_model` reward, trained by `lmforge reward`) or reward functions, per-token rewards
score − β·KL(policy‖reference), GAE advantages (whitened), the clipped objective plus a clipped value loss over
minibatch epochs — on the one engine: `PPOObjective` + the `PPOBatches` rollout source + `Trainer.fit()`.

The value head is a linear layer on the policy's final hidden states (trained with it; saved as value_head/). The
reference is the policy with its LoRA adapters disabled (method lora: no second copy) or a frozen copy (method
full). With kl_target, β adapts to keep the KL near it. Held-out evaluation: the mean reward of greedy answers to
the validation prompts, before and after. Outputs as grpo: adapter/, final/, value_head/, eval.json, lmforge.json.
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
    run_dir: str = "runs/ppo"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, adapter/, final/, value_head/, eval.json."""
    method: Literal["lora", "full"] = "lora"
    """What trains (with the value head): LoRA adapters (the reference is the base) or every weight (a frozen copy)."""
    model: ModelSection = field(default_factory=ModelSection)
    """The policy."""
    data: PromptData = field(default_factory=PromptData)
    """The prompts."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="reward_model")])
    """The score: reward_model (options: path of a `lmforge reward` model) and/or reward functions, weighted."""
    prompts_per_round: int = 16
    """Prompts per generation round (per process), one completion each."""
    ppo_epochs: int = 2
    """Passes over each round's rollouts (minibatch epochs) before sampling again."""
    beta: float = 0.05
    """KL penalty coefficient in the per-token reward (initial value when kl_target is set)."""
    kl_target: float | None = None
    """Adaptive KL control: the per-completion KL β steers towards (null = fixed β)."""
    kl_horizon: int = 10000
    """Adaptive KL control horizon in rollouts (a larger horizon adapts β more slowly)."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over each round."""
    clip_eps: float = 0.2
    """Clipping of the probability ratio: [1 - clip_eps, 1 + clip_eps]."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    vf_clip: float | None = 0.2
    """Clipping of the value update around the rollout's values (reward units; null = none)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
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
        step = self.train.micro_batch * self.train.grad_accum
        if self.prompts_per_round < 1 or self.prompts_per_round % step:
            raise ValueError(f"prompts_per_round {self.prompts_per_round} must fill whole optimizer steps of "
                             f"train.micro_batch x train.grad_accum = {step} rows")
        if self.ppo_epochs < 1 or self.beta < 0 or not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ValueError(f"need ppo_epochs >= 1, beta >= 0, 0 <= lam <= 1, 0 < gamma <= 1; found {self.ppo_epochs}, "
                             f"{self.beta}, {self.lam}, {self.gamma}")
        if self.train.parallel.dp == "fsdp" or self.train.parallel.tp > 1:
            raise ValueError("train.parallel: ppo samples with the whole model on each process; use ddp")


def main(cfg: Config) -> int:
    from functools import partial

    from ..engine.trainer import Trainer
    from ..objectives.rl import PPOObjective, value_head
    from ..precision import autocast
    from ..rl.batches import PPOBatches
    from . import _rl

    r = _rl.start(cfg, reference=True, extend=value_head)  # the value head trains: made before the optimizer
    t, world = cfg.train, r.world
    if world.main:
        print(f"ppo ({cfg.method}): {r.trainable:,} trainable of {r.total:,} parameters (value head included); "
              f"{len(r.train_ids):,} training prompts, {len(r.val_ids):,} held out; rounds of "
              f"{cfg.prompts_per_round} rollouts x {cfg.ppo_epochs} epochs")
    data = PPOBatches(r.model, r.tok, r.train_ids, r.train_records, r.rewards, prompts_per_round=cfg.prompts_per_round,
                      ppo_epochs=cfg.ppo_epochs, micro_batch=t.micro_batch, grad_accum=t.grad_accum,
                      sampling=cfg.sampling, beta=cfg.beta, kl_target=cfg.kl_target, kl_horizon=cfg.kl_horizon,
                      gamma=cfg.gamma, lam=cfg.lam, whiten=cfg.whiten_advantages, seed=t.seed,
                      rank=world.data_rank, world=world.data_world,
                      autocast=partial(autocast, t.precision, world.device), ref_model=r.ref_model)
    objective = PPOObjective(cfg.clip_eps, cfg.vf_coef, cfg.vf_clip, cfg.entropy_coef, cfg.sampling.temperature)
    trainer = Trainer(r.model, objective, data, t, r.run, [], world, evaluators=r.evaluators(cfg))

    def save_value_head() -> str:
        from safetensors.torch import save_file

        folder = r.run / "value_head"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous() for k, v in r.model.value_head.state_dict().items()},
                  str(folder / "value_head.safetensors"))
        del r.model.value_head  # not part of the policy's architecture
        return f"; last KL {data.last_stats.get('kl', float('nan')):.4f}"

    return _rl.finish("ppo", cfg, r, trainer, data, before_save=save_value_head)
