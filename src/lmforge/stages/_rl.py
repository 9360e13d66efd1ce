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
        from ..eval.runners import training_evaluators
        from ..rl.rollouts import reward_evaluator

        return ([reward_evaluator(self.tok, self.val_ids, self.val_records, self.rewards, cfg.sampling)]
                + training_evaluators(cfg.train, self.tok))


def start(cfg, reference: bool, extend: Callable[[Any], None] | None = None) -> RLRun:
    """Set up an RL run: the process group, config.yaml, the rewards, the prompts (checked against the fields the
    rewards read) encoded within the room max_new_tokens leaves, the policy with cfg.method's transform and -- when
    `reference` and the method trains every weight -- its frozen copy on the device (under LoRA the reference is the
    policy with its adapters disabled). `extend(model)` adds trainable parts (PPO's value head) before counting."""
    import copy

    from ..data.prompts import load_prompt_data
    from ..rl.rewards import Rewards
    from ..rl.rollouts import encode_prompts, prompt_room
    from ..transforms import count_parameters
    from . import _tune

    t = _tune.start(cfg)
    world, run, tok = t.world, t.run, t.tok
    rewards = Rewards(cfg.rewards)
    train_recs, val_recs, fingerprint = load_prompt_data(cfg.data, rewards, cfg.train.seed)
    model, _, _ = _tune.tuned_model(cfg, tok)
    ref_model = None
    if reference and cfg.method == "full":
        ref_model = copy.deepcopy(model).requires_grad_(False).to(world.device)
    if extend is not None:
        extend(model)
    room = prompt_room(cfg.data.max_prompt_length, cfg.sampling.max_new_tokens, model.cfg.max_position_embeddings)
    trainable, total = count_parameters(model)
    return RLRun(world, run, tok, rewards, model, ref_model, train_recs, val_recs,
                 encode_prompts(tok, train_recs, cfg.data.chat, room),
                 encode_prompts(tok, val_recs, cfg.data.chat, room),
                 fingerprint, trainable, total)


def finish(stage: str, cfg, r: RLRun, trainer, data, before_save: Callable[[], str] | None = None) -> int:
    """`runs.finish` with the RL outputs: eval.json holds the held-out reward (before -> after) and the last round's
    rollout statistics; `before_save()` writes stage-specific outputs (PPO's value head) and returns a note for the
    summary."""
    from ..engine import runs
    from ..transforms.methods import save_trained

    note = []

    def result(last: dict[str, Any]) -> dict[str, Any]:
        return {**runs.eval_summary(trainer, last), "last_round": data.last_stats}

    def save(_) -> Path:
        note.append(before_save() if before_save is not None else "")
        return save_trained(r.model, r.tok, r.run, cfg.method, cfg.model.init_from, save_merged=cfg.save_merged)

    def summary(res: dict[str, Any]) -> str:
        before = res.get("before", {}).get("val_reward")
        change = f"{before:.4f} -> " if before is not None else ""
        return f"held-out reward {change}{res.get('val_reward', float('nan')):.4f}{note[0]}"

    return runs.finish(trainer, stage, cfg, save, summary, r.trainable, r.total, result=result,
                       title=f"{stage} ({cfg.method})", method=cfg.method,
                       data={"prompts": cfg.data.train, "fingerprint": r.fingerprint},
                       rewards=[s.name for s in cfg.rewards])
