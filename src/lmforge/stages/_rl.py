"""What `lmforge ppo` and `lmforge grpo` share around their batch source and objective: reading and encoding the
prompts, building the policy (and, for full fine-tuning, its frozen reference copy), the held-out reward evaluator,
and the outputs after `Trainer.fit()` (eval.json with the last round's rollout statistics, adapter/, final/,
lmforge.json)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class RLRun:
    """An RL stage's inputs, ready for its batch source."""

    world: Any
    run: Path
    tok: Any
    rewards: Any
    model: Any
    ref_model: Any
    train_records: list[dict[str, Any]]
    val_records: list[dict[str, Any]]
    train_ids: list[list[int]]
    val_ids: list[list[int]]
    fingerprint: str
    trainable: int
    total: int

    def evaluators(self, cfg) -> list[Callable]:
        """The held-out reward of greedy answers, then the config's train.eval_tasks."""
        from ..data.rollouts import reward_evaluator
        from ..eval.runners import training_evaluators

        return ([reward_evaluator(self.tok, self.val_ids, self.val_records, self.rewards, cfg.sampling)]
                + training_evaluators(cfg.train, self.tok))


def start(cfg, reference: bool, extend: Callable[[Any], None] | None = None) -> RLRun:
    """Set up an RL run: the process group, config.yaml, the rewards, the prompts (checked against the fields the
    rewards read) encoded within the room max_new_tokens leaves, the policy with cfg.method's transform and -- when
    `reference` and the method trains every weight -- its frozen copy on the device (under LoRA the reference is the
    policy with its adapters disabled). `extend(model)` adds trainable parts (PPO's value head) before counting."""
    import copy

    import torch

    from ..data.preference import load_prompt_data
    from ..data.rollouts import encode_prompts, prompt_room
    from ..engine import runs
    from ..models.loading import load_tokenizer
    from ..objectives.rewards import Rewards
    from ..transforms import count_parameters
    from ..transforms.methods import build_model

    world, run = runs.start(cfg)
    rewards = Rewards(cfg.rewards)
    tok = load_tokenizer(cfg.model.init_from)
    train_recs, val_recs, fingerprint = load_prompt_data(cfg.data, rewards, cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.init_from, cfg.method, tok=tok, precision=cfg.train.precision, lora=cfg.lora)
    ref_model = None
    if reference and cfg.method == "full":
        ref_model = copy.deepcopy(model).requires_grad_(False).to(world.device)
    if extend is not None:
        extend(model)
    room = prompt_room(cfg.data.max_prompt_length, cfg.sampling.max_new_tokens, model.cfg.max_position_embeddings)
    trainable, total = count_parameters(model)
    return RLRun(world, run, tok, rewards, model, ref_model, train_recs, val_recs,
                 encode_prompts(tok, train_recs, cfg.data.chat, room), encode_prompts(tok, val_recs, cfg.data.chat, room),
                 fingerprint, trainable, total)


def finish(stage: str, cfg, r: RLRun, trainer, data, before_save: Callable[[], str] | None = None) -> int:
    """Fit, then on the main process write eval.json (held-out reward before -> after, the last round's rollout
    statistics), adapter/ and final/ and the lineage, and print a summary; 130 when a signal stopped the run.
    `before_save()` writes stage-specific outputs and returns a note for the summary."""
    from ..engine import distributed as D
    from ..engine import runs
    from ..transforms.methods import save_trained

    last = runs.fit(trainer)
    if last is None:
        return 130
    if r.world.main:
        result = runs.eval_summary(trainer, last)
        result["last_round"] = data.last_stats
        note = before_save() if before_save is not None else ""
        final = save_trained(r.model, r.tok, r.run, cfg.method, cfg.model.init_from, save_merged=cfg.save_merged)
        runs.write_lineage(runs.lineage(stage, cfg, cfg.model.init_from, r.trainable, r.total, method=cfg.method,
                                        data={"prompts": cfg.data.train, "fingerprint": r.fingerprint},
                                        rewards=[s.name for s in cfg.rewards]), r.run, final)
        trainer.write_json("eval.json", result)
        before = result.get("before", {}).get("val_reward")
        change = f"{before:.4f} -> " if before is not None else ""
        print(f"{stage} ({cfg.method}): {trainer.step} steps; held-out reward {change}"
              f"{result.get('val_reward', float('nan')):.4f}{note}; saved {final}")
    D.shutdown()
    return 0
