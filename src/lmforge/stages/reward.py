"""`lmforge reward --config recipes/align/reward-smollm2.yaml`: a reward model — a pretrained body with a scalar head
(head classifier, num_labels 1) trained with the Bradley–Terry loss −log σ(r_chosen − r_rejected − margin) on
preference pairs (`objectives.preference.RewardObjective`); the held-out pairwise accuracy and margin are measured
before and after.

Each pair is rendered by the chat template (`data/preference.py`); the head reads the reply's end-of-turn token,
which is the model's end-of-sequence token for ChatML templates such as SmolLM2's. Outputs in the run directory:
`final/` (a classifier folder with one output, which `lmforge.load` reads and other stages load as a reward model;
`lmforge serve` answers /v1/classify on it with {"output": <reward>, "scores": null} per input, the input being the
conversation rendered up to the end of the reply, `data.preference.scoring_text`, to which the server appends the
end-of-sequence token), `adapter/` (LoRA, PEFT layout with the head as modules_to_save), `eval.json`,
`metrics.jsonl`, `lmforge.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..data.preference import PreferenceData
from ..engine.trainer import TrainConfig
from ..transforms.lora import LoraConfig
from ..transforms.methods import FreezeSection, ModelSection


@dataclass
class Config:
    run_dir: str = "runs/reward"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/, eval.json."""
    method: Literal["full", "freeze", "lora", "qlora"] = "lora"
    """What trains besides the new scalar head: everything, the top blocks, LoRA, or LoRA on an NF4 base."""
    model: ModelSection = field(default_factory=ModelSection)
    """The body the reward model starts from."""
    data: PreferenceData = field(default_factory=PreferenceData)
    """Preference pairs (prompt, chosen, rejected, optional margin)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, eval_at_start=True))
    """The engine."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA settings (the head trains in full as modules_to_save)."""
    freeze: FreezeSection = field(default_factory=FreezeSection)
    """Freeze settings (method freeze)."""
    center_coef: float | None = None
    """Add c·(r_chosen + r_rejected)² to the loss to keep rewards near zero (Eisenstein et al. 2023); None = off."""
    save_merged: bool = True
    """LoRA / QLoRA: also write the merged model to final/ (the adapter alone goes to adapter/)."""

    def validate(self) -> None:
        if self.center_coef is not None and self.center_coef < 0:
            raise ValueError(f"center_coef must be >= 0 or null, found {self.center_coef}")


def main(cfg: Config) -> int:
    from ..data.preference import PairCollate, load_preference_data
    from ..data.readers import require_validation
    from ..engine import runs
    from ..objectives.preference import RewardObjective
    from ..transforms.methods import save_trained
    from . import _tune

    t = _tune.start(cfg)
    world, run, tok = t.world, t.run, t.tok
    train, val, summary = load_preference_data(cfg.data, tok, cfg.train.seed, close_truncated=True)
    require_validation(val, cfg.data)
    model, trainable, total = _tune.tuned_model(cfg, tok, head="classifier", num_labels=1)
    if world.main:
        print(summary)
        print(f"reward ({cfg.method}): {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.3f}%)")
    trainer = _tune.example_trainer(cfg, t, model, RewardObjective(cfg.center_coef), train, val,
                                    PairCollate(tok.padding_id))

    def save(_):
        return save_trained(model, tok, run, cfg.method, cfg.model.init_from, save_merged=cfg.save_merged)

    return runs.finish(trainer, "reward", cfg, save, _summary, trainable, total, title=f"reward ({cfg.method})",
                       method=cfg.method)


def _summary(result: dict[str, Any]) -> str:
    """Held-out accuracy and margin, before -> after when the run evaluated at the start."""
    before = result.get("before", {})
    parts = []
    for key, name in (("val_accuracy", "held-out pairwise accuracy"), ("val_margin", "margin")):
        if key in result:
            start = f"{before[key]:.4f} -> " if key in before else ""
            parts.append(f"{name} {start}{result[key]:.4f}")
    return ", ".join(parts)
