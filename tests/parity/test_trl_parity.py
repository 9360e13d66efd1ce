"""Parity with TRL 1.16: the preference losses and the sequence log-probs of `objectives/preference.py`.

Each loss is compared with TRL's own code on identical random log-probs / rewards (fp64, ≤ 1e-6): the trainers'
loss methods are called on instances built with `object.__new__` and given only the attributes those methods
read; where the formula sits inside `_compute_loss` (DPO, IPO, KTO, reward), a stand-in model returns the given
per-token log-probs (or rewards) the way a model patched by TRL's fused LM head does. The sequence log-probs are
compared on a tiny Llama (transformers) and the same weights loaded by lmforge, in fp32 (≤ 1e-5). Last, with LoRA,
the reference never changes, only trainable parameters move, and the adapters-disabled reference equals a frozen
copy of the base. Every assertion message carries the measured max abs diff.
"""

from __future__ import annotations

import copy
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO and ORPO live in trl.experimental in TRL 1.x
pytest.importorskip("trl")

from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402
from trl.trainer.reward_trainer import RewardTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head, selective_log_softmax  # noqa: E402

import lmforge  # noqa: E402
from lmforge.models import Transformer  # noqa: E402
from lmforge.models.presets import preset  # noqa: E402
from lmforge.objectives.preference import (PreferenceObjective, RewardObjective, adapters_disabled,  # noqa: E402
                                           bradley_terry_loss, completion_logprobs, dpo_loss, ipo_loss, kto_loss,
                                           orpo_loss, sequence_logprobs, simpo_loss)
from lmforge.transforms import LoraConfig, LoRALinear, apply_lora  # noqa: E402

transformers.utils.logging.disable_progress_bar()

TOL_LOSS = 1e-6
TOL_LOGPS = 1e-5
F64 = torch.float64


def _diff(a, b) -> float:
    return (torch.as_tensor(a, dtype=F64) - torch.as_tensor(b, dtype=F64)).abs().max().item()


# ---- stand-ins for the parts of a TRL trainer its loss code touches --------------------------------------------

class _Accelerator:
    """The accelerate.Accelerator surface the loss code reads, on one CPU process."""

    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def unwrap_model(self, model):
        return model


def _trainer(cls, **attrs):
    """A TRL trainer instance without __init__ (no model, dataset or accelerate state), with `attrs` set."""
    tr = object.__new__(cls)
    base = dict(accelerator=_Accelerator(), model=SimpleNamespace(training=True), aux_loss_enabled=False,
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    tr.__dict__.update(base, **attrs)
    return tr


class _FusedLogProbs:
    """A causal LM patched with TRL's fused LM head, reduced to its output: fixed per-token log-probs (N, T - 1),
    chosen by sequence length T (so a KTO batch and its KL batch can differ)."""

    def __init__(self, per_token: dict[int, torch.Tensor]):
        self.per_token = per_token

    def __call__(self, input_ids=None, labels=None, fused_lm_head=False, **kw):
        lp = self.per_token[input_ids.shape[1]]
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool(), log_sum_sq_probs=z,
                               aux_loss=None)


def _completion_mask(n: int, t: int, g: torch.Generator) -> torch.Tensor:
    """(n, t) 0/1: a prompt of 2..4 tokens, then a completion of 1..t-4 tokens, then padding."""
    m = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        p = int(torch.randint(2, 5, (1,), generator=g))
        c = int(torch.randint(1, t - p + 1, (1,), generator=g))
        m[i, p:p + c] = 1
    return m


def _per_token(mask: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random log-probs (N, T - 1) at the completion positions (shifted mask), 0 elsewhere, as TRL's head gives."""
    shifted = mask[:, 1:].to(F64)
    return -torch.rand(shifted.shape, generator=g, dtype=F64) * 4 * shifted


# ---- losses vs TRL on identical log-probs ----------------------------------------------------------------------

@pytest.mark.parametrize("loss,beta", [("dpo", 0.1), ("dpo", 0.5), ("ipo", 0.1), ("ipo", 0.4)])
def test_dpo_ipo_match_trl_dpo_trainer(loss, beta):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 12
    comp = _completion_mask(2 * b, t, g)
    per_token = _per_token(comp, g)
    ref = -torch.rand(2 * b, generator=g, dtype=F64) * 30
    inputs = dict(input_ids=torch.zeros(2 * b, t, dtype=torch.long), attention_mask=torch.ones(2 * b, t),
                  completion_mask=comp, ref_chosen_logps=ref[:b], ref_rejected_logps=ref[b:])
    tr = _trainer(DPOTrainer, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                  loss_types=["sigmoid" if loss == "dpo" else "ipo"], loss_weights=[1.0], beta=beta,
                  label_smoothing=0.0, use_weighting=False)
    theirs = tr._compute_loss(_FusedLogProbs({t: per_token}), inputs, return_outputs=False)

    logps, n = per_token.sum(-1), comp.sum(-1)
    if loss == "dpo":
        losses, rc, rr = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta)
    else:
        losses, rc, rr = ipo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta, n[:b], n[b:])
    d = _diff(losses.mean(), theirs)
    assert d <= TOL_LOSS, f"{loss} loss differs from TRL by {d:.3g}"
    m = tr._metrics["train"]
    for key, ours in [("rewards/chosen", rc.mean()), ("rewards/rejected", rr.mean()),
                      ("rewards/margins", (rc - rr).mean()), ("rewards/accuracies", (rc > rr).double().mean()),
                      ("logps/chosen", logps[:b].mean()), ("logps/rejected", logps[b:].mean())]:
        d = _diff(ours, m[key][-1])
        assert d <= TOL_LOSS, f"{loss} metric {key} differs from TRL by {d:.3g}"
    assert 0 < (rc > rr).double().mean() < 1  # both outcomes present: the accuracy comparison means something


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_conservative_dpo_matches_trl_label_smoothed_sigmoid(eps):
    """TRL 1.16's DPO 'sigmoid' has no label smoothing any more; its cDPO form lives in CPOTrainer.cpo_loss
    ('sigmoid'), which on log-ratios (policy − reference) is exactly conservative DPO."""
    g = torch.Generator().manual_seed(1)
    pc, pr, rc_, rr_ = (-torch.rand(16, generator=g, dtype=F64) * 40 for _ in range(4))
    tr = _trainer(CPOTrainer, alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=eps)
    theirs, _, _ = tr.cpo_loss(pc - rc_, pr - rr_)
    ours, _, _ = dpo_loss(pc, pr, rc_, rr_, beta=0.2, label_smoothing=eps)
    d = _diff(ours, theirs)
    assert d <= TOL_LOSS, f"cDPO (eps={eps}) differs from TRL by {d:.3g}"


@pytest.mark.parametrize("kl_sign", ["positive", "negative", "none"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_matches_trl_kto_trainer(kl_sign, weights):
    g = torch.Generator().manual_seed(2)
    n, t, t_kl = 8, 12, 10
    with_kl = kl_sign != "none"
    comp, comp_kl = _completion_mask(n, t, g), _completion_mask(n, t_kl, g)
    per_token, per_token_kl = _per_token(comp, g), _per_token(comp_kl, g)
    # the KL estimate mean(policy − reference) on the mismatched pairs: positive, or negative (then clamped to 0)
    per_token_kl = per_token_kl * (0.2 if kl_sign == "positive" else 3.0)
    label = torch.tensor([True, False, True, True, False, False, True, False])
    ref = -torch.rand(n, generator=g, dtype=F64) * 30
    ref_kl = -torch.rand(n, generator=g, dtype=F64) * 6
    inputs = dict(input_ids=torch.zeros(n, t, dtype=torch.long), attention_mask=torch.ones(n, t),
                  completion_mask=comp, label=label, ref_logps=ref)
    if with_kl:
        inputs.update(KL_input_ids=torch.zeros(n, t_kl, dtype=torch.long), KL_attention_mask=torch.ones(n, t_kl),
                      KL_completion_mask=comp_kl, ref_KL_logps=ref_kl)
    tr = _trainer(KTOTrainer, calculate_KL=with_kl, precompute_ref_logps=True, loss_type="kto", beta=0.1,
                  desirable_weight=weights[0], undesirable_weight=weights[1])
    theirs = tr._compute_loss(_FusedLogProbs({t: per_token, t_kl: per_token_kl}), inputs, return_outputs=False)

    logps, kl_logps = per_token.sum(-1), per_token_kl.sum(-1)
    losses, rc, rr, kl = kto_loss(logps[label], logps[~label], ref[label], ref[~label],
                                  kl_logps if with_kl else None, ref_kl if with_kl else None, 0.1, *weights)
    d = _diff(losses.mean(), theirs)
    assert d <= TOL_LOSS, f"KTO loss differs from TRL by {d:.3g}"
    m = tr._metrics["train"]
    for key, ours in [("kl", kl), ("rewards/chosen", rc.mean()), ("rewards/rejected", rr.mean())]:
        d = _diff(ours, m[key][-1])
        assert d <= TOL_LOSS, f"KTO metric {key} differs from TRL by {d:.3g}"
    raw = (kl_logps - ref_kl).mean()
    assert (kl > 0 and raw > 0) if kl_sign == "positive" else (kl == 0 and (raw < 0 or not with_kl))


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (0.1, 0.5)])
def test_simpo_matches_trl_cpo_trainer(beta, gamma, eps):
    g = torch.Generator().manual_seed(3)
    pc, pr = (-torch.rand(16, generator=g, dtype=F64) * 3 for _ in range(2))  # length-averaged log-probs
    tr = _trainer(CPOTrainer, alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps)
    theirs = tr.cpo_loss(pc, pr)
    ours = simpo_loss(pc, pr, beta=beta, gamma=gamma, label_smoothing=eps)
    for name, a, b in zip(("losses", "rewards/chosen", "rewards/rejected"), ours, theirs):
        d = _diff(a, b)
        assert d <= TOL_LOSS, f"SimPO {name} differs from TRL by {d:.3g}"


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl_orpo_trainer(beta):
    g = torch.Generator().manual_seed(4)
    pc, pr = (-torch.rand(16, generator=g, dtype=F64) * 2.5 - 0.01 for _ in range(2))  # both sides of −log 2
    assert (pc < -0.6931).any() and (pc > -0.6931).any()
    nll = torch.rand((), generator=g, dtype=F64) * 3  # TRL's chosen cross-entropy, a batch scalar
    tr = _trainer(ORPOTrainer, beta=beta)
    ratio_losses, trc, trr, _, mean_log_odds = tr.odds_ratio_loss(pc, pr)
    theirs = nll - ratio_losses.mean()  # ORPOTrainer.get_batch_loss_metrics: policy_nll_loss - losses.mean()
    losses, rc, rr, log_odds = orpo_loss(pc, pr, beta=beta, nll=nll)
    for name, a, b in [("loss", losses.mean(), theirs), ("rewards/chosen", rc, trc), ("rewards/rejected", rr, trr),
                       ("log_odds", log_odds.mean(), mean_log_odds)]:
        d = _diff(a, b)
        assert d <= TOL_LOSS, f"ORPO {name} differs from TRL by {d:.3g}"


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_bradley_terry_matches_trl_reward_trainer(margin, center):
    g = torch.Generator().manual_seed(5)
    b = 8
    rewards = torch.randn(2 * b, 1, generator=g, dtype=F64) * 2
    inputs = dict(input_ids=torch.zeros(2 * b, 4, dtype=torch.long), attention_mask=torch.ones(2 * b, 4))
    m = torch.rand(b, generator=g, dtype=F64) if margin else None
    if margin:
        inputs["margin"] = m
    tr = _trainer(RewardTrainer, args=SimpleNamespace(center_rewards_coefficient=center))
    theirs = tr.compute_loss(lambda **kw: SimpleNamespace(logits=rewards), inputs)
    losses, rc, rr = bradley_terry_loss(rewards[:b, 0], rewards[b:, 0], m, center)
    d = _diff(losses.mean(), theirs)
    assert d <= TOL_LOSS, f"Bradley–Terry loss differs from TRL by {d:.3g}"
    for key, ours in [("accuracy", (rc > rr).double().mean()), ("margin", (rc - rr).mean())]:
        d = _diff(ours, tr._metrics["train"][key][-1])
        assert d <= TOL_LOSS, f"reward metric {key} differs from TRL by {d:.3g}"


# ---- sequence log-probs vs TRL ---------------------------------------------------------------------------------

V = 128
_LLAMA = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _pairs(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A paired batch, chosen rows then rejected rows sharing their prompt, right-padded: input_ids,
    attention_mask, completion_mask (2b, T) (TRL's layout) and labels (2b, T) (lmforge's: shifted, -100 = none)."""
    g = torch.Generator().manual_seed(seed)
    rows, comps = [], []
    for _ in range(b):
        prompt = torch.randint(1, V, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g)
        for _ in range(2):
            rows.append(torch.cat([prompt, torch.randint(1, V, (int(torch.randint(1, 8, (1,), generator=g)),),
                                                         generator=g)]))
            comps.append(len(prompt))
    order = list(range(0, 2 * b, 2)) + list(range(1, 2 * b, 2))  # chosen rows first
    t = max(len(r) for r in rows)
    ids = torch.zeros(2 * b, t, dtype=torch.long)
    attn, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, j in enumerate(order):
        ids[i, :len(rows[j])], attn[i, :len(rows[j])], comp[i, comps[j]:len(rows[j])] = rows[j], 1, 1
    hf_labels = ids.masked_fill(comp == 0, -100)
    labels = torch.cat([hf_labels[:, 1:], torch.full((2 * b, 1), -100)], dim=1)  # labels[:, t] = token t + 1
    return dict(input_ids=ids, attention_mask=attn, completion_mask=comp, hf_labels=hf_labels, labels=labels)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """(the transformers LlamaForCausalLM, the same weights loaded by lmforge), fp32, off their init."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA)).eval()
    g = torch.Generator().manual_seed(100)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(folder)
    ours, _ = lmforge.load(folder)
    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # what DPOTrainer adds
    return hf, ours


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_match_trl_get_batch_logps(average):
    """Same logits: ours with shift=True against TRL's get_batch_logps (selective_log_softmax), values and grads."""
    g = torch.Generator().manual_seed(6)
    batch = _pairs(4, seed=1)
    logits = (torch.randn(*batch["input_ids"].shape, V, generator=g, dtype=F64) * 3).requires_grad_(True)
    theirs = CPOTrainer.get_batch_logps(logits, batch["hf_labels"], average_log_prob=average)
    ours, n = sequence_logprobs(logits, batch["hf_labels"], average=average, shift=True)
    d = _diff(ours, theirs)
    assert d <= TOL_LOSS, f"sequence log-probs differ from TRL by {d:.3g}"
    assert torch.equal(n, (batch["hf_labels"][:, 1:] != -100).sum(-1))
    w = torch.randn(ours.shape, generator=g, dtype=F64)
    (grad_theirs,) = torch.autograd.grad((theirs * w).sum(), logits)
    (grad_ours,) = torch.autograd.grad((ours * w).sum(), logits)
    d = _diff(grad_ours, grad_theirs)
    assert d <= TOL_LOSS, f"gradient of the sequence log-probs differs from TRL's by {d:.3g}"
    aligned, _ = sequence_logprobs(logits[:, :-1], batch["hf_labels"][:, 1:], average=average)  # shift=False
    assert _diff(aligned, ours) == 0.0


def test_sequence_logprobs_bf16_logits_are_scored_in_fp32():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 1000, generator=g) * 4
    labels = torch.randint(0, 1000, (2, 5), generator=g)
    ours, _ = sequence_logprobs(logits.bfloat16(), labels)
    assert ours.dtype == torch.float32
    ref = selective_log_softmax(logits.bfloat16().float(), labels).sum(-1)  # the same bf16 values, fp32 maths
    d = _diff(ours, ref)
    assert d <= TOL_LOGPS, f"bf16 logits: log-probs differ from fp32 maths by {d:.3g}"


def test_completion_logprobs_match_trl_fused_head_on_the_same_model(llama_pair):
    """DPOTrainer's log-probs (the fused LM head on the HF model, unshifted labels) against ours on the lmforge
    model loaded from the same folder (shifted labels, logits only for completion columns)."""
    hf, ours = llama_pair
    batch = _pairs(3)
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["hf_labels"],
                    fused_lm_head=True).log_probs.sum(-1)
        mine, n = completion_logprobs(ours, batch["input_ids"], batch["labels"], batch["attention_mask"])
    d = _diff(mine, theirs)
    assert d <= TOL_LOGPS, f"sequence log-probs of the same model differ from TRL's by {d:.3g}"
    assert torch.equal(n, batch["completion_mask"].sum(-1))


@pytest.mark.parametrize("loss,beta", [("dpo", 0.1), ("ipo", 0.5)])
def test_objective_matches_trl_dpo_trainer_end_to_end(llama_pair, loss, beta):
    """PreferenceObjective on the lmforge model against DPOTrainer._compute_loss on the HF model (fused head),
    same precomputed reference log-probs: loss and metrics, and the gradient reaching the LM head."""
    hf, ours = llama_pair
    batch = _pairs(3, seed=2)
    g = torch.Generator().manual_seed(8)
    ref = -torch.rand(6, generator=g) * 40
    tr = _trainer(DPOTrainer, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                  loss_types=["sigmoid" if loss == "dpo" else "ipo"], loss_weights=[1.0], beta=beta,
                  label_smoothing=0.0, use_weighting=False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    theirs = tr._compute_loss(hf, dict(inputs, ref_chosen_logps=ref[:3], ref_rejected_logps=ref[3:]), False)
    mine, metrics = PreferenceObjective(loss, beta=beta)(ours, dict(
        input_ids=batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"],
        ref_chosen_logps=ref[:3], ref_rejected_logps=ref[3:]))
    d = _diff(mine, theirs)
    assert d <= TOL_LOGPS, f"{loss}: objective loss differs from TRL's trainer by {d:.3g}"
    m = tr._metrics["train"]
    for ours_key, their_key in [("rewards/chosen", "rewards/chosen"), ("rewards/margin", "rewards/margins"),
                                ("rewards/accuracy", "rewards/accuracies"), ("logps/rejected", "logps/rejected")]:
        d = _diff(metrics[ours_key], m[their_key][-1])
        assert d <= TOL_LOGPS, f"{loss}: metric {ours_key} differs from TRL by {d:.3g}"
    assert metrics["tokens"] == 3
    hf.zero_grad()
    ours.zero_grad()
    theirs.backward()
    mine.backward()
    d = _diff(ours.lm_head.weight.grad, hf.lm_head.weight.grad)
    scale = hf.lm_head.weight.grad.abs().max().item()
    assert scale > 0 and d <= 1e-4 * scale, f"{loss}: LM head gradient differs from TRL's by {d:.3g} (max {scale:.3g})"


# ---- the objective with LoRA: the reference stays put ----------------------------------------------------------

def _lora_model() -> tuple[Transformer, Transformer]:
    """(llama-tiny with a LoRA adapter whose B is off zero, a frozen deep copy of its base taken before LoRA)."""
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny"))
    base = copy.deepcopy(model)
    apply_lora(model, LoraConfig(rank=4, alpha=8, targets=["q", "v", "up"]))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.1)
    return model.train(), base


def _lm_pairs(b: int = 3, seed: int = 3) -> dict[str, torch.Tensor]:
    batch = _pairs(b, seed)
    return {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}


def test_adapters_disabled_reference_equals_frozen_copy():
    model, base = _lora_model()
    batch = _lm_pairs()
    args = batch["input_ids"], batch["labels"], batch["attention_mask"]
    by_adapters = PreferenceObjective("dpo")._reference(model, *args)
    by_copy = PreferenceObjective("dpo", ref_model=base)._reference(model, *args)
    d = _diff(by_adapters, by_copy)
    assert d <= TOL_LOSS, f"adapters-disabled reference differs from a frozen copy of the base by {d:.3g}"
    with torch.no_grad():
        policy, _ = completion_logprobs(model, *args)
    assert _diff(policy, by_copy) > 1e-3  # the adapters are on outside the context: the two paths are not trivial
    assert all(m.active == "default" for m in model.modules() if isinstance(m, LoRALinear))  # restored


@pytest.mark.parametrize("reference", ["adapters", "copy"])
def test_step_moves_only_trainable_parameters_and_never_the_reference(reference):
    model, base = _lora_model()
    objective = PreferenceObjective("dpo", beta=0.5, ref_model=base if reference == "copy" else None)
    batch = _lm_pairs()
    args = batch["input_ids"], batch["labels"], batch["attention_mask"]
    ref_before = objective._reference(model, *args)
    base_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    loss, metrics = objective(model, batch)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        state = "moved" if moved else "did not move"
        assert moved == p.requires_grad, f"{n}: {state} after the step (requires_grad={p.requires_grad})"
    assert any(p.requires_grad for p in model.parameters()) and not all(p.requires_grad for p in model.parameters())
    if reference == "copy":
        for n, p in base.named_parameters():
            assert torch.equal(p, base_before[n]) and not p.requires_grad, f"reference copy parameter {n} changed"
    ref_after = objective._reference(model, *args)
    d = _diff(ref_after, ref_before)
    assert d == 0.0, f"reference log-probs changed by {d:.3g} after an optimizer step"
    _, after = objective(model, batch)
    assert after["loss"] < metrics["loss"], "one step on a fixed batch did not lower the DPO loss"


def test_adapters_disabled_refuses_when_not_the_base():
    model, _ = _lora_model()
    with pytest.raises(ValueError, match="no reference"):
        with adapters_disabled(Transformer(preset("llama-tiny"))):
            pass
    model.get_submodule("blocks.0.mlp.down").requires_grad_(True)  # a layer trained in full
    with pytest.raises(ValueError, match="trained in full"):
        with adapters_disabled(model):
            pass


@pytest.mark.parametrize("loss", ["simpo", "orpo", "kto"])
def test_other_losses_run_on_the_model_and_train_the_adapters(loss):
    model, base = _lora_model()
    objective = PreferenceObjective(loss)
    batch = _lm_pairs(4, seed=4)
    if loss == "kto":  # unpaired: each row a completion with a label; the KL rows pair prompt i with completion i-1
        batch = dict(batch, label=torch.tensor([True, False, True, True, False, True, False, False]),
                     kl_input_ids=batch["input_ids"].roll(1, 0), kl_labels=batch["labels"].roll(1, 0),
                     kl_attention_mask=batch["attention_mask"].roll(1, 0))
    loss_value, metrics = objective(model, batch)
    assert torch.isfinite(loss_value) and torch.isclose(loss_value.detach(), metrics["loss"])
    loss_value.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)
    if loss == "kto":  # the same numbers with the reference as a frozen copy and precomputed
        with torch.no_grad():
            ref = completion_logprobs(base, batch["input_ids"], batch["labels"], batch["attention_mask"])[0]
            ref_kl = completion_logprobs(base, batch["kl_input_ids"], batch["kl_labels"],
                                         batch["kl_attention_mask"])[0]
        pre, _ = objective(model, dict(batch, ref_logps=ref, ref_kl_logps=ref_kl))
        copy_ref, _ = PreferenceObjective(loss, ref_model=base)(model, batch)
        assert _diff(pre, loss_value) <= TOL_LOSS and _diff(copy_ref, loss_value) <= TOL_LOSS
        assert metrics["kl"] >= 0 and "rewards/margin" in metrics
    else:
        assert {"rewards/margin", "rewards/accuracy", "logps/chosen"} <= set(metrics)


def test_reward_objective_on_a_scalar_head():
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", head="classifier", num_labels=1))
    batch = _lm_pairs(3)
    loss, metrics = RewardObjective()(model, dict(batch, margin=torch.tensor([0.0, 0.5, 1.0])))
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    expected = -torch.nn.functional.logsigmoid(out[:3] - out[3:] - torch.tensor([0.0, 0.5, 1.0])).mean()
    assert _diff(loss, expected) <= TOL_LOSS and metrics["tokens"] == 3
