"""`lmforge dpo --config recipes/align/dpo-smollm2.yaml`: preference optimisation without a reward model — DPO, IPO,
KTO, SimPO or ORPO (`objectives.preference.PreferenceObjective`) on a causal LM, full or with LoRA.

The reference model (dpo, ipo, kto; simpo and orpo have none) is, by default, the model itself with its LoRA
adapters disabled (no second copy in memory), or a frozen copy for full / freeze training. With
`precompute_reference` its log-probs are computed once over the training and validation data before training and
carried in the batches: no reference model during training. The held-out split is evaluated before and after:
the objective's metrics (implicit rewards: rewards/accuracy, rewards/margin; logps/chosen, logps/rejected) and, for
paired data, the policy's own preference: logps/accuracy, the share of pairs whose chosen reply has the higher
log-prob, and logps/margin, the mean log-prob difference. Outputs as `lmforge finetune`: `final/` (LoRA merged),
`adapter/` (PEFT layout), `eval.json`, `metrics.jsonl`, `lmforge.json`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..data.preference import PreferenceData
from ..engine.trainer import TrainConfig
from ..transforms.lora import LoraConfig
from ..transforms.methods import FreezeSection, ModelSection

REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class Config:
    run_dir: str = "runs/dpo"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/, eval.json."""
    loss: Literal["dpo", "ipo", "kto", "simpo", "orpo"] = "dpo"
    """Preference loss: dpo, ipo (squared), kto (unpaired, prospect theory), simpo / orpo (no reference model)."""
    beta: float | None = None
    """β of the loss (IPO's τ, ORPO's λ); None = the usual value: 0.1, simpo 2.0."""
    label_smoothing: float = 0.0
    """dpo / simpo: probability that a preference label is flipped (conservative DPO)."""
    gamma: float = 1.0
    """simpo: target reward margin γ."""
    desirable_weight: float = 1.0
    """kto: weight λ_D of desirable examples."""
    undesirable_weight: float = 1.0
    """kto: weight λ_U of undesirable examples."""
    reference: Literal["auto", "copy", "adapters_off", "none"] = "auto"
    """Reference model: the model with its LoRA adapters disabled, a frozen copy, or none (simpo, orpo); auto picks
    adapters_off under LoRA, copy otherwise, none for simpo / orpo."""
    precompute_reference: bool = False
    """Compute the reference log-probs once before training and drop the reference model."""
    method: Literal["full", "freeze", "lora", "qlora"] = "lora"
    """What trains: everything, the top blocks, LoRA, or LoRA on an NF4 base."""
    model: ModelSection = field(default_factory=ModelSection)
    """The model (also the reference)."""
    data: PreferenceData = field(default_factory=PreferenceData)
    """Preference pairs (prompt, chosen, rejected); kto also reads unpaired (prompt, completion, label)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, eval_at_start=True))
    """The engine."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA settings (method lora, qlora)."""
    freeze: FreezeSection = field(default_factory=FreezeSection)
    """Freeze settings (method freeze)."""
    save_merged: bool = True
    """LoRA / QLoRA: also write the merged model to final/ (the adapter alone goes to adapter/)."""

    def resolved_reference(self) -> str:
        """The reference `auto` stands for."""
        if self.reference != "auto":
            return self.reference
        if self.loss in REFERENCE_FREE:
            return "none"
        return "adapters_off" if self.method in ("lora", "qlora") else "copy"

    def validate(self) -> None:
        ref = self.resolved_reference()
        if self.loss in REFERENCE_FREE and ref != "none":
            raise ValueError(f"reference: {self.loss} uses no reference model; set reference: none (or auto)")
        if self.loss in REFERENCE_FREE and self.precompute_reference:
            raise ValueError(f"precompute_reference: {self.loss} uses no reference model, so there is nothing to "
                             "precompute; set it to false")
        if self.loss not in REFERENCE_FREE and ref == "none":
            raise ValueError(f"reference: {self.loss} compares the policy with a reference model; use adapters_off "
                             "(LoRA), copy, or auto (or loss simpo / orpo, which need none)")
        if ref == "adapters_off" and self.method not in ("lora", "qlora"):
            raise ValueError(f"reference: adapters_off needs method lora or qlora (with method {self.method} the "
                             "base itself trains); use reference: copy")
        if self.beta is not None and not self.beta > 0:
            raise ValueError(f"beta must be > 0 or null, found {self.beta}")


def main(cfg: Config) -> int:
    import copy

    from ..data.preference import PairCollate, UnpairedCollate, load_preference_data
    from ..data.readers import require_validation
    from ..engine import runs
    from ..objectives.preference import PreferenceObjective, precompute_reference
    from ..transforms.methods import save_trained
    from . import _tune

    t = _tune.start(cfg)
    world, run, tok = t.world, t.run, t.tok
    kto = cfg.loss == "kto"
    train, val, summary = load_preference_data(cfg.data, tok, cfg.train.seed, unpaired=kto)
    require_validation(val, cfg.data)
    model, trainable, total = _tune.tuned_model(cfg, tok)
    ref_kind = cfg.resolved_reference()
    if world.main:
        print(summary)
        print(f"{cfg.loss} ({cfg.method}, reference {ref_kind}{', precomputed' if cfg.precompute_reference else ''}"
              f"): {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    pad = tok.padding_id
    collate = UnpairedCollate(pad) if kto else PairCollate(pad)
    mb = cfg.train.micro_batch
    ref_model = None
    if ref_kind == "copy" and not cfg.precompute_reference:
        ref_model = copy.deepcopy(model).to(world.device)  # frozen by the objective
    objective = PreferenceObjective(cfg.loss, cfg.beta, cfg.label_smoothing, cfg.gamma, cfg.desirable_weight,
                                    cfg.undesirable_weight, ref_model=ref_model)
    trainer = _tune.example_trainer(cfg, t, model, objective, train, val, collate)
    if not kto:
        trainer.evaluators.append(_policy_preference(val, collate, mb, cfg.train.eval_batches, trainer))
    if cfg.precompute_reference:  # the model before training is the reference; adapters off under LoRA
        model.to(world.device)
        for examples in (train, val):
            precompute_reference(model, examples, mb, pad, trainer.autocast(), base_only=ref_kind == "adapters_off")

    def save(_):
        return save_trained(model, tok, run, cfg.method, cfg.model.init_from, save_merged=cfg.save_merged)

    return runs.finish(trainer, "dpo", cfg, save, _summary, trainable, total, title=f"{cfg.loss} ({cfg.method})",
                       loss=cfg.loss, method=cfg.method, reference=ref_kind,
                       precompute_reference=cfg.precompute_reference)


def _policy_preference(val, collate, micro_batch: int, max_batches: int | None, trainer):
    """Evaluator: on the held-out pairs, the share where the model gives the chosen reply the higher summed
    log-prob (val_logps/accuracy, with its standard error) and the mean difference (val_logps/margin) — the
    model's own preference, which unlike the implicit rewards is measured the same way before training."""
    import torch

    from ..data.examples import fixed_batches
    from ..eval.metrics import mean_stderr
    from ..objectives.preference import completion_logprobs

    @torch.no_grad()
    def evaluate(model) -> dict[str, float]:
        device = next(model.parameters()).device
        diffs = []
        for batch in fixed_batches(val, micro_batch, collate, max_batches=max_batches):
            with trainer.autocast():
                logps, _ = completion_logprobs(model, batch["input_ids"].to(device), batch["labels"].to(device),
                                               batch["attention_mask"].to(device))
            chosen, rejected = logps.float().cpu().chunk(2)
            diffs.append(chosen - rejected)
        d = torch.cat(diffs)
        accuracy, stderr = mean_stderr((d > 0).float().tolist())
        return {"val_logps/accuracy": accuracy, "val_logps/accuracy_stderr": stderr,
                "val_logps/margin": d.mean().item()}

    return evaluate


def _summary(result: dict[str, Any]) -> str:
    """Held-out preference figures, before -> after when the run evaluated at the start."""
    before = result.get("before", {})
    parts = []
    for key, name in (("val_rewards/accuracy", "held-out implicit-reward accuracy"),
                      ("val_rewards/margin", "reward margin"), ("val_logps/accuracy", "log-prob preference accuracy"),
                      ("val_logps/margin", "log-prob margin")):
        if key in result:
            start = f"{before[key]:.4f} -> " if key in before else ""
            parts.append(f"{name} {start}{result[key]:.4f}")
    return ", ".join(parts)
