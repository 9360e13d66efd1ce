"""Preference optimisation: DPO, IPO, KTO, SimPO, ORPO and the Bradley–Terry reward-model loss.

The losses are pure functions of per-sequence log-probabilities (or rewards) and return per-example losses plus
the implicit rewards that the metrics use. `PreferenceObjective` runs them on a model and `RewardObjective` trains
a scalar reward head. Log-probs follow the project's label convention: labels are already shifted (`labels[:, t]`
is the token that position t predicts) and -100 marks positions that take no loss, as in `CausalLM` and `SFTCollate`.
TRL passes unshifted labels and shifts inside (`logits[:, :-1]` against `labels[:, 1:]`). `sequence_logprobs(...,
shift=True)` does the same, so the two give the same numbers.

Paired batch (dpo, ipo, simpo, orpo, reward): chosen rows first, then rejected rows, one forward pass:
  input_ids (2B, T), labels (2B, T), attention_mask (2B, T) optional (1 = real token, right padding),
  ref_chosen_logps (B,), ref_rejected_logps (B,) optional (precomputed reference log-probs, summed over tokens).
Unpaired batch (kto): input_ids (N, T), labels (N, T), attention_mask (N, T), label (N,) bool (True = desirable);
  optional kl_input_ids / kl_labels / kl_attention_mask (N, T'), the mismatched pairs (prompt i with the completion
  of example i - 1) for the KL estimate; optional ref_logps (N,), ref_kl_logps (N,) precomputed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100
_CHUNK_ELEMENTS = 1 << 24  # logits elements converted to fp32 at a time (64 MiB)
_ORPO_MAX_LOGP = -1e-6  # an average log-prob of exactly 0 would make log(1 - p) = -inf and the gradient NaN

__all__ = ["sequence_logprobs", "completion_logprobs", "dpo_loss", "ipo_loss", "kto_loss", "simpo_loss",
           "orpo_loss", "bradley_terry_loss", "adapters_disabled", "PreferenceObjective", "RewardObjective",
           "precompute_reference"]


# ---- sequence log-probabilities --------------------------------------------------------------------------------

class _SelectedLogSoftmax(torch.autograd.Function):
    """log softmax(logits[b, t])[label] at the given (b, t) positions only, as logit − logsumexp, taken in fp32 a
    chunk of rows at a time. Backward recomputes softmax from the saved logits, so neither an fp32 copy of the
    logits nor the (N, V) log-softmax is stored for the backward pass."""

    @staticmethod
    def forward(ctx, logits: Tensor, b: Tensor, t: Tensor, target: Tensor) -> Tensor:
        dt = torch.promote_types(logits.dtype, torch.float32)
        m, v = b.shape[0], logits.shape[-1]
        step = max(1, _CHUNK_ELEMENTS // max(v, 1))
        lse = torch.empty(m, dtype=dt, device=logits.device)
        for a in range(0, m, step):
            lse[a:a + step] = torch.logsumexp(logits[b[a:a + step], t[a:a + step]].to(dt), dim=-1)  # (n,)
        picked = logits[b, t, target].to(dt)  # (M,)
        ctx.save_for_backward(logits, b, t, target, lse)
        ctx.step = step
        return picked - lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, b, t, target, lse = ctx.saved_tensors
        out = torch.zeros_like(logits)
        for a in range(0, b.shape[0], ctx.step):
            s = slice(a, a + ctx.step)
            g = grad[s].to(lse.dtype)[:, None]  # (n, 1)
            p = torch.exp(logits[b[s], t[s]].to(lse.dtype) - lse[s, None])  # (n, V) softmax
            p.mul_(-g).scatter_add_(-1, target[s, None], g)  # (onehot − softmax) · grad
            out[b[s], t[s]] = p.to(logits.dtype)
        return out, None, None, None


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor | None = None, average: bool = False,
                      shift: bool = False) -> tuple[Tensor, Tensor]:
    """Per-sequence log p(labels): (sum over labelled positions, or their mean with `average`, (B,); count (B,)).

    logits (B, T, V) and labels (B, T) aligned (`labels[:, t]` is scored by `logits[:, t]`), positions with
    label -100 or `mask` 0 skipped. `shift=True` takes unshifted (Hugging Face / TRL) labels: scores
    `labels[:, 1:]` with `logits[:, :-1]`. Log-probs are in fp32 (fp64 for fp64 logits) and only labelled positions
    are computed; for the gradient only the logits themselves are kept (see `_SelectedLogSoftmax`). An empty
    sequence gives 0 (and 0 as its mean)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ in (batch, length)")
    sel = labels != IGNORE  # (B, T)
    if mask is not None:
        sel = sel & mask.bool()
    b, t = sel.nonzero(as_tuple=True)  # (M,), (M,): the scored positions
    token_logps = _SelectedLogSoftmax.apply(logits, b, t, labels[b, t])  # (M,)
    sums = token_logps.new_zeros(labels.shape[0]).index_add(0, b, token_logps)  # (B,)
    n = sel.sum(-1)  # (B,)
    return (sums / n.clamp(min=1) if average else sums), n


def completion_logprobs(model: nn.Module, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                        position_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed log-probs (B,) of the labelled (completion) tokens under `model` and their counts (B,). Logits are
    computed only for the columns that hold a label in some row (`logits_to_keep`), not for the shared prompt."""
    sel = labels != IGNORE  # (B, T)
    if not bool(sel.any(-1).all()):
        empty = (~sel.any(-1)).nonzero().squeeze(1).tolist()
        raise ValueError(f"rows {empty[:8]} of the batch have no labelled (completion) token: the prompt filled "
                         "max_length; drop those examples or raise max_length")
    cols = sel.any(0).nonzero().squeeze(1)  # (K,) columns with a label in some row
    out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=cols)
    return sequence_logprobs(out.logits, labels[:, cols])  # logits (B, K, V)


# ---- losses ----------------------------------------------------------------------------------------------------

def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):
    L = −log σ(β·[log π/π_ref(y_w) − log π/π_ref(y_l)]), inputs summed log-probs (B,).

    `label_smoothing` ε > 0 is conservative DPO (cDPO, Mitchell 2023): the label is flipped with probability ε,
    L = −(1 − ε)·log σ(βh) − ε·log σ(−βh). Returns (losses (B,), chosen rewards β·log π/π_ref(y_w),
    rejected rewards β·log π/π_ref(y_l)), the rewards detached."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected  # (B,) log-ratios
    z = beta * (chosen - rejected)
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, chosen_tokens: Tensor | None = None,
             rejected_tokens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17): L = (h − 1/(2τ))², h = log π/π_ref(y_w) − log π/π_ref(y_l), τ = `beta`.

    With token counts, each log-ratio is divided by its completion's length first (as TRL does, a choice the IPO
    authors confirmed to TRL; it makes τ independent of length). Returns (losses, β·chosen log-ratio, β·rejected
    log-ratio) with the rewards unnormalised, as TRL logs them."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected  # (B,)
    h_chosen = chosen if chosen_tokens is None else chosen / chosen_tokens.clamp(min=1)
    h_rejected = rejected if rejected_tokens is None else rejected / rejected_tokens.clamp(min=1)
    losses = (h_chosen - h_rejected - 1 / (2 * beta)) ** 2
    return losses, beta * chosen.detach(), beta * rejected.detach()


def kto_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             policy_kl: Tensor | None = None, ref_kl: Tensor | None = None, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7), unpaired:
    L(y) = λ_D·(1 − σ(β·(r(y) − z₀))) for desirable y, λ_U·(1 − σ(β·(z₀ − r(y)))) for undesirable y,
    with r = log π/π_ref (summed log-probs; chosen (Nc,), rejected (Nr,)) and the reference point
    z₀ = max(0, mean(log π/π_ref) over mismatched pairs) (`policy_kl`, `ref_kl` (N,)), detached; 0 without them.

    Returns (losses (Nc + Nr,) chosen first, chosen rewards β·r, rejected rewards β·r, z₀); the loss is their mean."""
    if policy_kl is None:
        kl = policy_chosen.new_zeros(())
    else:
        kl = (policy_kl - ref_kl).mean().detach().clamp(min=0)
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = torch.cat((desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))))
    return losses, beta * chosen.detach(), beta * rejected.detach(), kl


def simpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, beta: float = 2.0, gamma: float = 1.0,
               label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6):
    L = −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ), reference-free, on length-averaged log-probs (B,).

    γ is the target reward margin (in reward units; the paper uses γ/β ≈ 0.5); `label_smoothing` as in cDPO.
    Returns (losses, β·avg log π(y_w), β·avg log π(y_l))."""
    z = beta * (policy_chosen - policy_rejected) - gamma
    losses = -F.logsigmoid(z)
    if label_smoothing:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-z)
    return losses, beta * policy_chosen.detach(), beta * policy_rejected.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, beta: float = 0.1,
              nll: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs. 4–7):
    L = L_SFT − λ·log σ(log odds(y_w) − log odds(y_l)), odds(y) = P(y) / (1 − P(y)), P(y) = exp(mean log-prob)
    over the completion (inputs: length-averaged log-probs (B,)); λ = `beta`.

    L_SFT defaults to the paper's per-example −(1/|y_w|)·log P(y_w) = −policy_chosen; pass `nll` (scalar or (B,))
    to use another (TRL: token-mean cross-entropy over the chosen prompts and completions). Returns (losses (B,),
    chosen rewards β·avg log P(y_w), rejected rewards, log odds ratio (B,))."""
    pc, pr = policy_chosen.clamp(max=_ORPO_MAX_LOGP), policy_rejected.clamp(max=_ORPO_MAX_LOGP)
    log_odds = (pc - pr) - (_log1mexp(pc) - _log1mexp(pr))  # (B,)
    sft = -policy_chosen if nll is None else nll
    losses = sft - beta * F.logsigmoid(log_odds)
    return losses, beta * policy_chosen.detach(), beta * policy_rejected.detach(), log_odds.detach()


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None,
                       center_coef: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reward model loss, Bradley–Terry (Ouyang et al. 2022, "InstructGPT", eq. 1):
    L = −log σ(r(x, y_w) − r(x, y_l) − m), with an optional per-pair margin m (Llama 2, Touvron et al. 2023,
    eq. 2) and optional centring c·(r_w + r_l)² (Eisenstein et al. 2023) that keeps rewards near zero.
    Returns (losses (B,), r_chosen, r_rejected) with the rewards detached."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (r_chosen + r_rejected) ** 2
    return losses, r_chosen.detach(), r_rejected.detach()


# ---- reference = the same model without its adapters -----------------------------------------------------------

@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base for the duration: every LoRA layer computes its base layer only, with no second
    copy of the weights. Refuses when that would not be the base model: no LoRA layer, an adapter merged into
    the base weights, or other parameters trained in full (modules_to_save)."""
    from ..transforms.lora import LoRALinear

    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("no reference: pass ref_model (a frozen copy), precomputed ref_*_logps in the batch, "
                         "or train LoRA adapters so the reference is the model with its adapters disabled")
    merged = sorted({m.merged for m in layers if m.merged is not None})
    if merged:
        raise ValueError(f"adapter(s) {merged} are merged into the base weights, so disabling adapters does not "
                         "give the reference model; call unmerge_lora(model) first")
    full = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_A." not in n
            and ".lora_B." not in n and not n.startswith("value_head.")]  # PPO's value head is outside the LM
    if full:
        raise ValueError(f"parameters {full[:4]} are trained in full (not LoRA), so the model with its adapters "
                         "disabled is not the reference; pass ref_model (a frozen copy) instead")
    saved = [m.active for m in layers]
    try:
        for m in layers:
            m.active = None
        yield model
    finally:
        for m, a in zip(layers, saved):
            m.active = a


# ---- objectives ------------------------------------------------------------------------------------------------

_BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "simpo": 2.0, "orpo": 0.1}


def _mean(x: Tensor) -> Tensor:
    return x.float().mean() if x.numel() else x.new_zeros((), dtype=torch.float32)


class PreferenceObjective:
    """Preference optimisation on a causal LM: `loss` = dpo | ipo | kto | simpo | orpo (see the loss functions).

    The reference (dpo, ipo, kto; simpo and orpo have none) comes, in this order, from precomputed log-probs in
    the batch, from `ref_model` (a frozen module, run under no_grad), or from the model itself with its LoRA
    adapters disabled. Metrics: loss, rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy (paired),
    logps/chosen, logps/rejected (the log-probs the loss uses: sums, or means for simpo/orpo), kl (kto),
    nll and log_odds (orpo); `tokens` is the number of examples (pairs, or kto's completions), the weight of
    these per-example means."""

    per_token_nll = False

    def __init__(self, loss: Literal["dpo", "ipo", "kto", "simpo", "orpo"] = "dpo", beta: float | None = None,
                 label_smoothing: float = 0.0, gamma: float = 1.0, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, ref_model: nn.Module | None = None):
        if loss not in _BETA:
            raise ValueError(f"loss must be one of {', '.join(_BETA)}, found {loss!r}")
        beta = _BETA[loss] if beta is None else beta
        if not beta > 0:
            raise ValueError(f"beta must be > 0, found {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), found {label_smoothing}")
        if label_smoothing and loss not in ("dpo", "simpo"):
            raise ValueError(f"label_smoothing applies to dpo and simpo, not {loss}")
        if desirable_weight <= 0 or undesirable_weight <= 0:
            raise ValueError("desirable_weight and undesirable_weight must be > 0")
        self.loss, self.beta, self.label_smoothing, self.gamma = loss, beta, label_smoothing, gamma
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.ref_model = ref_model
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)

    def _reference(self, model: nn.Module, input_ids: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
        with torch.no_grad():
            if self.ref_model is not None:
                return completion_logprobs(self.ref_model, input_ids, labels, mask)[0]
            with adapters_disabled(model):
                return completion_logprobs(model, input_ids, labels, mask)[0]

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        if self.loss == "kto":
            return self._kto(model, batch)
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        if ids.shape[0] % 2:
            raise ValueError(f"a preference batch holds chosen then rejected rows; found {ids.shape[0]} rows (odd)")
        logps, n = completion_logprobs(model, ids, labels, mask, batch.get("position_ids"))  # (2B,), (2B,)
        chosen, rejected = logps.chunk(2)  # (B,) each
        n_chosen, n_rejected = n.chunk(2)
        metrics: dict[str, Any] = {}
        if self.loss in ("dpo", "ipo"):
            if "ref_chosen_logps" in batch:
                ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self._reference(model, ids, labels, mask).chunk(2)
            if self.loss == "dpo":
                losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                                                        self.label_smoothing)
            else:
                losses, r_chosen, r_rejected = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                                                        n_chosen, n_rejected)
        else:
            chosen, rejected = chosen / n_chosen, rejected / n_rejected  # (B,) length-averaged
            if self.loss == "simpo":
                losses, r_chosen, r_rejected = simpo_loss(chosen, rejected, self.beta, self.gamma,
                                                          self.label_smoothing)
            else:
                losses, r_chosen, r_rejected, log_odds = orpo_loss(chosen, rejected, self.beta)
                metrics.update(nll=-_mean(chosen.detach()), log_odds=_mean(log_odds))
        loss = losses.mean()
        metrics.update({"loss": loss.detach(), "rewards/chosen": _mean(r_chosen), "rewards/rejected": _mean(r_rejected),
                        "rewards/margin": _mean(r_chosen - r_rejected),
                        "rewards/accuracy": _mean((r_chosen > r_rejected).float()),
                        "logps/chosen": _mean(chosen.detach()), "logps/rejected": _mean(rejected.detach()),
                        "tokens": chosen.shape[0]})
        return loss, metrics

    def _kto(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        ids, labels, mask = batch["input_ids"], batch["labels"], batch.get("attention_mask")
        if "label" not in batch:
            raise ValueError("a kto batch needs 'label' (N,) booleans: True for a desirable completion")
        desirable = batch["label"].bool()  # (N,)
        logps, _ = completion_logprobs(model, ids, labels, mask, batch.get("position_ids"))  # (N,)
        has_kl = "kl_input_ids" in batch
        if has_kl:
            kl_ids, kl_labels, kl_mask = batch["kl_input_ids"], batch["kl_labels"], batch.get("kl_attention_mask")
            with torch.no_grad():
                policy_kl = completion_logprobs(model, kl_ids, kl_labels, kl_mask)[0]  # (N,)
        if "ref_logps" in batch:
            ref = batch["ref_logps"]
            ref_kl = batch.get("ref_kl_logps")
            if has_kl and ref_kl is None:
                raise ValueError("the batch has precomputed ref_logps and kl_input_ids but no ref_kl_logps")
        else:
            ref = self._reference(model, ids, labels, mask)
            ref_kl = self._reference(model, kl_ids, kl_labels, kl_mask) if has_kl else None
        losses, r_chosen, r_rejected, kl = kto_loss(
            logps[desirable], logps[~desirable], ref[desirable], ref[~desirable],
            policy_kl if has_kl else None, ref_kl, self.beta, self.desirable_weight, self.undesirable_weight)
        loss = losses.mean()
        metrics: dict[str, Any] = {"loss": loss.detach(), "kl": kl.float(), "tokens": ids.shape[0]}
        if r_chosen.numel():  # absent, rather than a made-up 0, when the batch has no desirable example
            metrics.update({"rewards/chosen": _mean(r_chosen), "logps/chosen": _mean(logps[desirable].detach())})
        if r_rejected.numel():
            metrics.update({"rewards/rejected": _mean(r_rejected),
                            "logps/rejected": _mean(logps[~desirable].detach())})
        if r_chosen.numel() and r_rejected.numel():
            metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return loss, metrics


class RewardObjective:
    """Reward model training with the Bradley–Terry loss (`bradley_terry_loss`) on a scalar head (head=classifier,
    num_labels=1) over a paired batch (chosen rows, then rejected rows); an optional `margin` (B,) in the batch.
    Metrics: loss, accuracy, margin, rewards/chosen, rewards/rejected; `tokens` = pairs."""

    per_token_nll = False

    def __init__(self, center_coef: float | None = None):
        self.center_coef = center_coef

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        if out.logits is None or out.logits.dim() != 2 or out.logits.shape[-1] != 1:
            found = None if out.logits is None else tuple(out.logits.shape)
            raise ValueError(f"the model gives logits {found}, expected (2B, 1): load it with head='classifier', "
                             "num_labels=1")
        r_chosen, r_rejected = out.logits.float().squeeze(-1).chunk(2)  # (B,) each
        losses, rc, rr = bradley_terry_loss(r_chosen, r_rejected, batch.get("margin"), self.center_coef)
        loss = losses.mean()
        return loss, {"loss": loss.detach(), "accuracy": _mean((rc > rr).float()), "margin": _mean(rc - rr),
                      "rewards/chosen": _mean(rc), "rewards/rejected": _mean(rr), "tokens": rc.shape[0]}


# ---- precomputed reference -------------------------------------------------------------------------------------

@torch.no_grad()
def precompute_reference(model: nn.Module, examples: Sequence[Any], micro_batch: int, pad_id: int,
                         autocast: contextlib.AbstractContextManager | None = None, base_only: bool = False) -> None:
    """Fill the reference log-probs of pair or KTO examples (`ref_chosen` / `ref_rejected`, or `ref` / `ref_kl`)
    with `model` (its LoRA adapters disabled with `base_only`), so training needs no reference model."""
    from ..data.preference import UnpairedExample, reply_rows

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with adapters_disabled(model) if base_only else contextlib.nullcontext():
            for i in range(0, len(examples), micro_batch):
                chunk = examples[i:i + micro_batch]
                kto = isinstance(chunk[0], UnpairedExample)
                rows = ([reply_rows([(x.prompt, x.completion, x.mask) for x in chunk], pad_id),
                         reply_rows([(x.kl_prompt, x.kl_completion, x.kl_mask) for x in chunk], pad_id)] if kto else
                        [reply_rows([(x.prompt, x.chosen, x.chosen_mask) for x in chunk]
                                    + [(x.prompt, x.rejected, x.rejected_mask) for x in chunk], pad_id)])
                logps = []
                for b in rows:
                    with autocast or contextlib.nullcontext():
                        lp, _ = completion_logprobs(model, b["input_ids"].to(device), b["labels"].to(device),
                                                    b["attention_mask"].to(device))
                    logps.append(lp.float().cpu().tolist())  # (rows,) summed over each reply
                for j, x in enumerate(chunk):
                    if kto:
                        x.ref, x.ref_kl = logps[0][j], logps[1][j]
                    else:
                        x.ref_chosen, x.ref_rejected = logps[0][j], logps[0][len(chunk) + j]
    finally:
        model.train(was_training)
