"""RL maths for PPO and GRPO: pure tensor functions over a response mask (B, T), shared by both objectives.

Conventions. Tensors are (B, T) with `mask` (bool or 0/1) set on response tokens; prompt tokens before the response
(a left offset) and padding after it are 0. Values at unmasked positions may hold anything, NaN and ±inf included:
every function selects with `torch.where` before arithmetic, so they reach neither the result nor the gradient.
`logp` is log π_θ(a_t | s_t) of the sampled token, `old_logp` the same under the policy that sampled the rollout,
`ref_logp` under the frozen reference.

Papers: PPO — Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347); GAE — Schulman
et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation" (arXiv:1506.02438);
RLHF reward — Ziegler et al. 2019 (arXiv:1909.08593) eq. 2, Ouyang et al. 2022 "InstructGPT" (arXiv:2203.02155)
eq. 2; GRPO — Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300) eqs. 3-4 and §4.1.2; Dr. GRPO — Liu et al. 2025,
"Understanding R1-Zero-Like Training" (arXiv:2503.20783); KL estimators — Schulman 2020,
http://joschu.net/blog/kl-approx.html.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

KLKind = Literal["k1", "k2", "k3"]
GroupScale = Literal["std", "batch", "none"]
GRPOLossType = Literal["grpo", "bnpo", "dr_grpo"]


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _per_token(x: Tensor, like: Tensor) -> Tensor:
    """A per-sequence (B,) tensor as (B, 1), broadcastable against (B, T); a (B, T) one unchanged."""
    return x.unsqueeze(-1) if x.dim() == like.dim() - 1 else x  # (B,) -> (B, 1)


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ values over set mask positions (all of them, or along `dim`); unmasked entries never enter, even if NaN."""
    picked = torch.where(_as_bool(mask), values, 0)
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` over set mask positions (all, or along `dim`); 0 where the mask is empty, never NaN.

    Same value as TRL 0.x `core.masked_mean` on a non-empty mask (that one divides by zero on an empty mask and
    lets NaN padding through `values * mask`)."""
    count = _as_bool(mask).sum() if dim is None else _as_bool(mask).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the set mask positions; `unbiased` applies Bessel's n/(n−1) (skipped when n ≤ 1, so a single
    token gives 0 rather than TRL's division by zero)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = _as_bool(mask).sum().to(var.dtype)  # not int / int: that divides in float32
        var = var * torch.where(n > 1, n / (n - 1).clamp(min=1), 1.0)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, unbiased: bool = True,
                  eps: float = 1e-8) -> Tensor:
    """Whiten over the set mask positions: (x − mean)/√(var + eps), adding the mean back when `shift_mean=False`
    (the form used on rewards); unmasked positions are returned unchanged.

    Advantage whitening is not in the PPO paper; it comes from OpenAI baselines ppo2 and lm-human-preferences
    (Ziegler et al. 2019), both of which use the biased (population) variance. We follow TRL 0.x `core.masked_whiten`
    (`masked_var(unbiased=True)`, eps 1e-8 inside the root), so the whitened tokens have *unbiased* sample std 1;
    `unbiased=False` gives the baselines variant (population std 1). The difference is a factor √(n/(n−1)),
    negligible at PPO batch sizes. Unlike TRL, padding keeps its values instead of being shifted and scaled too."""
    m = _as_bool(mask)
    mean, var = masked_mean(values, m), masked_var(values, m, unbiased=unbiased)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, values)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from tokens sampled from π (Schulman 2020, "Approximating KL divergence").

    With log r = ref_logp − logp: k1 = −log r (unbiased, can be negative; InstructGPT's per-token penalty);
    k2 = ½(log r)² (biased, low variance); k3 = (r − 1) − log r (unbiased and ≥ 0; GRPO's D_KL, DeepSeekMath eq. 4).
    k3 is computed as expm1(log r) − log r, which keeps precision for nearby policies where TRL's
    exp(log r) − log r − 1 cancels to float noise (≈1e-7 absolute in float32 while the true value is ~(log r)²/2)."""
    log_ratio = logp - ref_logp  # log π/π_ref at the sampled token
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        log_r = -log_ratio  # log π_ref/π
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl_penalty: kind={kind!r}; expected 'k1', 'k2' or 'k3'")


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of the last set position of each row of a (B, T) mask; −1 for an empty row."""
    m = _as_bool(mask)
    positions = torch.arange(m.shape[-1], device=m.device).expand_as(m)  # (T,) -> (B, T)
    return torch.where(m, positions, -1).amax(-1)


def per_token_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float,
                      kind: KLKind = "k1") -> Tensor:
    """(B, T) PPO rewards: −β·KL(π‖π_ref) on every response token, plus the reward-model score (B,) at the last one.

    Ziegler et al. 2019 eq. 2 / InstructGPT eq. 2 define R(x, y) = r(x, y) − β log(π(y|x)/π_ref(y|x)); the
    implementations (lm-human-preferences, TRL PPO) spread the log ratio over tokens (k1, the default here) and put
    r(x, y) on the final token, so the undiscounted sum over the response is exactly R(x, y). The mask must include
    the EOS token when the response has one. Zero outside the mask."""
    m = _as_bool(mask)
    last = last_token_index(m)  # (B,)
    if bool((last < 0).any()):
        rows = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"per_token_rewards: rows {rows} have no response token in the mask; the score is "
                         "placed on the last response token, so every row needs at least one")
    rewards = torch.where(m, -beta * kl_penalty(logp, ref_logp, kind), 0)
    return rewards.scatter_add(-1, last[:, None], score[:, None].to(rewards.dtype))  # (B,) -> (B, 1)


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95,
        last_value: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the masked tokens: (advantages, returns), both (B, T), 0 off-mask.

    δ_t = r_t + γV(s_{t+1}) − V(s_t) and Â_t = δ_t + γλÂ_{t+1} (Schulman et al. 2016 eq. 16, in the truncated
    form of PPO eqs. 11-12); returns R_t = Â_t + V(s_t) are the value targets (TD(λ) returns). The recursion runs
    backwards over the set positions only, carrying V(s_{t+1}) and Â_{t+1} across unset ones, so a left offset,
    right padding, or a hole inside the mask (e.g. tool output) are skipped, not treated as steps; rewards and
    values there are ignored. After the last response token the bootstrap value is `last_value` (B,), default 0: an
    end of sequence is terminal. Pass V of the next state only for a rollout cut off by the length limit.
    No gradient: advantages and returns are targets."""
    m = _as_bool(mask)
    batch, steps = rewards.shape
    next_value = values.new_zeros(batch) if last_value is None else last_value.to(values.dtype)
    next_adv = values.new_zeros(batch)
    columns = []
    for t in reversed(range(steps)):
        mt = m[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv_t = delta + gamma * lam * next_adv
        next_adv = torch.where(mt, adv_t, next_adv)
        next_value = torch.where(mt, values[:, t], next_value)
        columns.append(torch.where(mt, adv_t, 0))
    advantages = torch.stack(columns[::-1], dim=1)  # T × (B,) -> (B, T)
    returns = torch.where(m, advantages + values, 0)
    return advantages, returns


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2,
                    clip_eps_high: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017 eq. 7), as a loss to minimise, token mean over the mask:
    L = −E[min(r·A, clip(r, 1−ε, 1+ε)·A)], r = π_θ/π_old = exp(logp − old_logp).

    The gradient w.r.t. logp is −r·A/N where the unclipped term is the minimum and exactly 0 where clipping is
    active (r > 1+ε with A > 0, r < 1−ε with A < 0). `clip_eps_high` sets a separate upper bound (DAPO's
    clip-higher); default ε. `advantages` is (B, T) or (B,). Metrics (detached): `clip_frac` = share of tokens
    where clipping is active (as TRL's pg_clipfrac); `approx_kl` = k3 estimate of KL(π_old‖π_θ) from the rollout
    tokens (TRL logs ½(Δlogp)², i.e. k2; k3 is unbiased); `ratio` = mean r."""
    m = _as_bool(mask)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    adv = torch.where(m, _per_token(advantages, logp), 0)  # (B,) -> (B, 1) -> (B, T)
    log_ratio = torch.where(m, logp - old_logp, 0)  # masked before exp: padding cannot reach the gradient
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_eps, 1 + hi)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        metrics = {"policy_loss": loss.detach(),
                   "clip_frac": masked_mean((clipped > unclipped).to(loss.dtype), m),
                   "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, m),
                   "ratio": masked_mean(ratio, m)}
    return loss, metrics


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: float | None = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ½·E[max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)], token mean over the mask.

    The squared error is the PPO paper's L^VF (eq. 9); the clipping is OpenAI baselines ppo2's (also TRL's
    `cliprange_value`), not in the paper: a value moved more than ε from V_old in the direction that lowers the
    error gets no gradient. ε is in reward units, so it interacts with the reward scale. `clip=None` gives the
    plain ½ MSE. Metrics: `value_loss`, `value_clip_frac` (share of tokens where the clipped term is larger)."""
    m = _as_bool(mask)
    vals = torch.where(m, values, 0)
    target = torch.where(m, returns, 0)
    unclipped = (vals - target) ** 2
    if clip is None:
        per_token, clip_frac = unclipped, unclipped.new_zeros(())
    else:
        old = torch.where(m, old_values, 0)
        clipped = (old + (vals - old).clamp(-clip, clip) - target) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clip_frac = masked_mean((clipped > unclipped).to(per_token.dtype), m).detach()
    loss = 0.5 * masked_mean(per_token, m)
    return loss, {"value_loss": loss.detach(), "value_clip_frac": clip_frac}


def entropy_from_logits(logits: Tensor, mask: Tensor | None = None, chunk_size: int = 1024) -> Tensor:
    """Per-token entropy H = −Σ_v p_v log p_v in nats, (…, V) -> (…), in float32, 0 where `mask` is unset.

    Rows are processed `chunk_size` at a time so a float32 copy of the whole (B, T, V) tensor never exists
    (TRL's `entropy_from_logits` chunks the same way but keeps the input dtype). Vocabulary entries masked to −inf
    contribute 0 to the value and the gradient. Average with `masked_mean(h, mask)` for the logged entropy."""
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # (..., V) -> (N, V)
    parts = []
    for chunk in flat.split(chunk_size):
        logp = F.log_softmax(chunk.float(), dim=-1)
        finite_logp = logp.masked_fill(torch.isneginf(logp), 0.0)  # p = 0 there: p·log p := 0, no 0·inf NaN
        parts.append(-(logp.exp() * finite_logp).sum(-1))
    entropy = torch.cat(parts).reshape(logits.shape[:-1])  # (N,) -> (...)
    return entropy if mask is None else torch.where(_as_bool(mask), entropy, 0)


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """log softmax(logits / temperature) gathered at `tokens`: (…, V), (…) -> (…), float32, chunked over rows.
    Same as TRL's `selective_log_softmax`; logits[t] must already be the prediction for tokens[t]."""
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature={temperature}; expected > 0")
    vocab = logits.shape[-1]
    flat, ids = logits.reshape(-1, vocab), tokens.reshape(-1, 1)  # (..., V) -> (N, V); (...) -> (N, 1)
    parts = []
    for chunk, idx in zip(flat.split(chunk_size), ids.split(chunk_size), strict=True):
        scaled = chunk.float() / temperature if temperature != 1.0 else chunk.float()
        parts.append((scaled.gather(-1, idx) - torch.logsumexp(scaled, -1, keepdim=True)).squeeze(-1))
    return torch.cat(parts).reshape(tokens.shape)  # (N,) -> (...)


def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased std ignoring NaN (as TRL's `nanstd`), but 0 rather than NaN with ≤ 1 valid value; keepdim."""
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    valid = ~torch.isnan(x)
    count = valid.sum(dims, keepdim=True)
    centred = torch.where(valid, x - torch.nanmean(x, dim=dims, keepdim=True), 0)
    var = (centred ** 2).sum(dims, keepdim=True) / (count - 1).clamp(min=1)
    return var.sqrt()


@torch.no_grad()
def group_advantages(rewards: Tensor, group_size: int, scale: GroupScale = "std", eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages (N·G,) for G = `group_size` completions per prompt, stored prompt-major.

    Â_i = (r_i − mean(r_group)) / (std(r_group) + eps) — DeepSeekMath §4.1.2 (outcome supervision), the same
    Â for every token of completion i. `scale="none"` drops the division (Dr. GRPO, Liu et al. 2025 §3.1: the std
    weights questions by difficulty); `scale="batch"` divides by the std of the whole batch (TRL's "batch").
    As TRL 1.16: unbiased std, eps added to the std (the paper states neither), NaN rewards (unscorable completions)
    are left out of the baseline and get advantage 0. A group of identical rewards gets 0, not NaN."""
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.reshape(-1, group_size)  # (N·G,) -> (N, G)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)  # (N, G) - (N, 1)
    if scale == "std":
        centred = centred / (_nanstd(grouped, dim=1) + eps)  # (N, G) / (N, 1)
    elif scale == "batch":
        centred = centred / (_nanstd(grouped) + eps)  # (N, G) / (1, 1)
    elif scale != "none":
        raise ValueError(f"group_advantages: scale={scale!r}; expected 'std', 'batch' or 'none'")
    advantages = centred.reshape(-1)  # (N, G) -> (N·G,)
    return torch.where(torch.isnan(advantages), 0, advantages)


def grpo_loss(logp: Tensor, old_logp: Tensor | None, ref_logp: Tensor | None, advantages: Tensor, mask: Tensor,
              clip_eps: float = 0.2, beta: float = 0.04, loss_type: GRPOLossType = "grpo",
              clip_eps_high: float | None = None, max_len: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO loss: per token −min(r·Â, clip(r, 1−ε, 1+ε)·Â) + β·k3(π_θ‖π_ref) (DeepSeekMath eq. 3 with the eq. 4
    estimator), r = π_θ/π_old, Â (B,) from `group_advantages` (or (B, T)). Aggregation, as TRL 1.16
    `GRPOTrainer._compute_loss`:

    - "grpo": mean over each sequence's tokens, then over sequences — eq. 3's (1/G)Σ_i (1/|o_i|)Σ_t (length bias);
    - "bnpo": one token mean over the batch, Σ/Σmask (DAPO's token-level sum, over this micro-batch);
    - "dr_grpo": Σ over tokens / (B · `max_len`) with a constant `max_len` (Dr. GRPO: no 1/|o_i|); pass the
      configured maximum completion length (TRL's `max_completion_length`); None uses T, which is only constant
      when batches are padded to the maximum.

    `old_logp=None` means on-policy (one update per rollout): r = 1 in value, ∇r = ∇logp. β = 0 skips the
    reference (`ref_logp` may be None) and the KL metric. Metrics: `kl` (token mean of k3), `clip_low` / `clip_high`
    / `clip_frac` (tokens where the lower / upper / either clip is active, TRL's clip_ratio/*), `ratio`."""
    m = _as_bool(mask)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    if old_logp is None:
        old_logp = logp.detach()
    adv = torch.where(m, _per_token(advantages, logp), 0)  # (B,) -> (B, 1) -> (B, T)
    log_ratio = torch.where(m, logp - old_logp, 0)  # masked before exp: padding cannot reach the gradient
    ratio = torch.exp(log_ratio)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + hi) * adv)
    metrics: dict[str, Any] = {}
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError(f"grpo_loss: beta={beta} needs ref_logp; pass beta=0 to train without a reference")
        log_r = torch.where(m, ref_logp - logp, 0)  # log π_ref/π_θ, masked first: padding cannot reach the gradient
        kl = torch.expm1(log_r) - log_r  # k3, as kl_penalty(logp, ref_logp, "k3")
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl.detach(), m)
    if loss_type == "grpo":
        loss = (masked_sum(per_token, m, dim=-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = masked_mean(per_token, m)
    elif loss_type == "dr_grpo":
        loss = masked_sum(per_token, m) / (per_token.shape[0] * (m.shape[-1] if max_len is None else max_len))
    else:
        raise ValueError(f"grpo_loss: loss_type={loss_type!r}; expected 'grpo', 'bnpo' or 'dr_grpo'")
    with torch.no_grad():
        low = (ratio < 1 - clip_eps) & (adv < 0)
        high = (ratio > 1 + hi) & (adv > 0)
        dtype = loss.dtype
        metrics.update(loss=loss.detach(), clip_low=masked_mean(low.to(dtype), m),
                       clip_high=masked_mean(high.to(dtype), m), clip_frac=masked_mean((low | high).to(dtype), m),
                       ratio=masked_mean(ratio, m))
    return loss, metrics


# ---- the GRPO objective ----------------------------------------------------------------------------------------

IGNORE = -100


def completion_token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                              labels: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token log π(labels) of a batch of (prompt + completion) rows, computed only for the K columns that hold a
    label in some row (the completion part; `logits_to_keep`), not for the shared prompt.

    Labels follow the project's convention (already shifted, −100 = no label). Returns (logp (B, K) float32, mask
    (B, K) bool, columns (K,), logits (B, K, V)); logits are divided by `temperature` before the softmax, as the
    sampler did (TRL does the same), so the ratios compare the distributions that were sampled from."""
    sel = labels != IGNORE  # (B, T)
    cols = sel.any(0).nonzero().squeeze(1)  # (K,)
    out = model(input_ids, attention_mask=attention_mask, logits_to_keep=cols)
    mask = sel[:, cols]  # (B, K)
    logp = token_logprobs(out.logits, labels[:, cols].clamp(min=0), temperature)  # (B, K, V) -> (B, K)
    return torch.where(mask, logp, 0), mask, cols, out.logits


class GRPOObjective:
    """GRPO (Shao et al. 2024, "DeepSeekMath", eq. 3 with the eq. 4 KL estimator): the clipped surrogate on
    group-normalised advantages plus β·k3(π_θ‖π_ref), per token over the completion (`grpo_loss`).

    Batch (from `rl.batches.GRPOBatches`): input_ids, attention_mask, labels (B, T) (prompt + completion rows,
    labels on the completion), advantages (B,), optional old_logps (B, T) (the sampling policy's, needed when a
    rollout is used for more than one update; absent = on-policy, ratio 1), ref_logps (B, T) when β > 0 (absent:
    computed here, from `ref_model` or the model with its LoRA adapters disabled), rewards (B,) and `rollout/…`
    scalars (logged as they are). Metrics: loss, kl (β > 0), clip_frac, clip_low, clip_high, ratio, entropy,
    reward, completion_len; `tokens` = completion tokens."""

    per_token_nll = False

    def __init__(self, beta: float = 0.04, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                 loss_type: GRPOLossType = "grpo", temperature: float = 1.0, max_completion_length: int | None = None,
                 ref_model: torch.nn.Module | None = None, log_entropy: bool = True):
        if beta < 0 or clip_eps <= 0 or (clip_eps_high is not None and clip_eps_high <= 0):
            raise ValueError(f"beta must be >= 0 and clip_eps (clip_eps_high) > 0, found beta={beta}, "
                             f"clip_eps={clip_eps}, clip_eps_high={clip_eps_high}")
        if loss_type not in ("grpo", "bnpo", "dr_grpo"):
            raise ValueError(f"loss_type must be grpo, bnpo or dr_grpo, found {loss_type!r}")
        self.beta, self.clip_eps, self.clip_eps_high, self.loss_type = beta, clip_eps, clip_eps_high, loss_type
        self.temperature, self.max_len, self.log_entropy = temperature, max_completion_length, log_entropy
        self.ref_model = ref_model

    @torch.no_grad()
    def _reference(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
        from .preference import adapters_disabled

        args = (batch["input_ids"], batch.get("attention_mask"), batch["labels"], self.temperature)
        if self.ref_model is not None:
            return completion_token_logprobs(self.ref_model, *args)[0]
        inner = getattr(model, "module", model)  # DDP's wrapped module
        with adapters_disabled(inner):
            return completion_token_logprobs(model, *args)[0]

    def __call__(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        logp, mask, cols, logits = completion_token_logprobs(model, batch["input_ids"], batch.get("attention_mask"),
                                                             batch["labels"], self.temperature)
        old = batch["old_logps"][:, cols] if "old_logps" in batch else None
        ref = None
        if self.beta:
            ref = batch["ref_logps"][:, cols] if "ref_logps" in batch else self._reference(model, batch)
        loss, m = grpo_loss(logp, old, ref, batch["advantages"], mask, self.clip_eps, self.beta, self.loss_type,
                            self.clip_eps_high, self.max_len)
        metrics: dict[str, Any] = dict(m)
        with torch.no_grad():
            if self.log_entropy:
                metrics["entropy"] = masked_mean(entropy_from_logits(logits.detach() / self.temperature, mask), mask)
            if "rewards" in batch:
                metrics["reward"] = torch.nanmean(batch["rewards"].float())
            metrics["completion_len"] = mask.sum(-1).float().mean()
        metrics.update({k: v for k, v in batch.items() if k.startswith("rollout/")})
        metrics["tokens"] = mask.sum()
        return loss, metrics


def value_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The scalar value head PPO trains on top of the policy's final hidden states (`model.value_head`), created
    (zero weights: V = 0 at the start) the first time it is asked for."""
    inner = getattr(model, "module", model)  # DDP's wrapped module
    if getattr(inner, "value_head", None) is None:
        p = next(inner.parameters())
        inner.value_head = torch.nn.Linear(inner.cfg.hidden_size, 1).to(p.device)
        torch.nn.init.zeros_(inner.value_head.weight)
        torch.nn.init.zeros_(inner.value_head.bias)
    return inner.value_head


def policy_and_values(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                      temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One forward pass for PPO: per-token log π(labels) (B, K), values V(s_t) (B, K) of the value head at the same
    positions (the state before each completion token), the mask (B, K), the columns (K,) and the logits."""
    sel = labels != IGNORE  # (B, T)
    cols = sel.any(0).nonzero().squeeze(1)  # (K,)
    out = model(input_ids, attention_mask=attention_mask, logits_to_keep=cols)
    mask = sel[:, cols]  # (B, K)
    logp = token_logprobs(out.logits, labels[:, cols].clamp(min=0), temperature)  # (B, K)
    head = value_head(model)
    values = head(out.hidden[:, cols].to(head.weight.dtype)).squeeze(-1).float()  # (B, K, C) -> (B, K)
    return torch.where(mask, logp, 0), torch.where(mask, values, 0), mask, cols, out.logits


class PPOObjective:
    """PPO for language models (Schulman et al. 2017 eq. 7 and 9; Ziegler et al. 2019; Ouyang et al. 2022 eq. 2):
    the clipped surrogate on GAE advantages plus vf_coef times the clipped value loss, minus entropy_coef times the
    entropy, over the completion tokens (`ppo_policy_loss`, `value_loss`).

    Batch (from `rl.batches.PPOBatches`): input_ids, attention_mask, labels (B, T); old_logps, old_values,
    advantages, returns (B, T) aligned with the labels; scores (B,) and `rollout/…` scalars. The KL penalty is in
    the rewards (so in the advantages), not in this loss. Metrics: loss, policy_loss, value_loss, clip_frac,
    approx_kl, value_clip_frac, entropy, score; `tokens` = completion tokens."""

    per_token_nll = False

    def __init__(self, clip_eps: float = 0.2, vf_coef: float = 0.1, vf_clip: float | None = 0.2,
                 entropy_coef: float = 0.0, temperature: float = 1.0):
        if clip_eps <= 0 or vf_coef < 0 or entropy_coef < 0 or (vf_clip is not None and vf_clip <= 0):
            raise ValueError(f"need clip_eps > 0, vf_coef >= 0, entropy_coef >= 0 and vf_clip > 0 or null; found "
                             f"{clip_eps}, {vf_coef}, {entropy_coef}, {vf_clip}")
        self.clip_eps, self.vf_coef, self.vf_clip = clip_eps, vf_coef, vf_clip
        self.entropy_coef, self.temperature = entropy_coef, temperature

    def __call__(self, model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        logp, values, mask, cols, logits = policy_and_values(model, batch["input_ids"], batch.get("attention_mask"),
                                                             batch["labels"], self.temperature)
        pick = {k: batch[k][:, cols] for k in ("old_logps", "old_values", "advantages", "returns")}
        pg, m = ppo_policy_loss(logp, pick["old_logps"], pick["advantages"], mask, self.clip_eps)
        vf, mv = value_loss(values, pick["old_values"], pick["returns"], mask, self.vf_clip)
        loss = pg + self.vf_coef * vf
        with torch.set_grad_enabled(bool(self.entropy_coef) and torch.is_grad_enabled()):
            entropy = masked_mean(entropy_from_logits(logits / self.temperature, mask), mask)
        if self.entropy_coef:
            loss = loss - self.entropy_coef * entropy
        metrics: dict[str, Any] = {**m, **mv, "loss": loss.detach(), "entropy": entropy.detach()}
        if "scores" in batch:
            metrics["score"] = batch["scores"].float().mean()
        metrics.update({k: v for k, v in batch.items() if k.startswith("rollout/")})
        metrics["tokens"] = mask.sum()
        return loss, metrics
