"""PPO / GRPO maths (objectives/rl.py): GAE against a hand-computed example and against per-row unpadded runs; the
clipped objective and its autograd gradient inside and outside the clip range; value-loss clipping; group
normalisation; the KL estimators (Monte Carlo against an exact KL); masked whitening; per-token rewards; and
parity with TRL 1.16's callables (selective_log_softmax, entropy_from_logits, nanstd) and with
GRPOTrainer._compute_loss itself, run on a stub trainer."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.objectives.rl import (entropy_from_logits, gae, group_advantages, grpo_loss, kl_penalty,
                                   last_token_index, masked_mean, masked_var, masked_whiten, per_token_rewards,
                                   ppo_policy_loss, token_logprobs, value_loss)

D = torch.float64


def _t(values, dtype=D) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------- GAE

def test_gae_hand_computed_four_steps():
    # γ = 0.9, λ = 0.8 (γλ = 0.72); terminal end, so V(s_4) = 0.
    #   r = [1.0, 0.0, -0.5, 2.0], V = [0.5, 1.0, 0.2, 0.4]
    #   δ3 = 2.0 + 0.9·0   − 0.4 =  1.6
    #   δ2 = -0.5 + 0.9·0.4 − 0.2 = -0.34
    #   δ1 = 0.0 + 0.9·0.2 − 1.0 = -0.82
    #   δ0 = 1.0 + 0.9·1.0 − 0.5 =  1.4
    #   A3 = 1.6
    #   A2 = -0.34 + 0.72·1.6       =  0.812
    #   A1 = -0.82 + 0.72·0.812     = -0.23536
    #   A0 =  1.4  + 0.72·(-0.23536) =  1.2305408
    #   R  = A + V = [1.7305408, 0.76464, 1.012, 2.0]
    rewards, values = _t([[1.0, 0.0, -0.5, 2.0]]), _t([[0.5, 1.0, 0.2, 0.4]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, _t([[1.2305408, -0.23536, 0.812, 1.6]]), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, _t([[1.7305408, 0.76464, 1.012, 2.0]]), rtol=0, atol=1e-12)

    # λ = 1: returns are the discounted Monte Carlo returns, whatever V is:
    #   G3 = 2.0, G2 = -0.5 + 0.9·2.0 = 1.3, G1 = 0 + 0.9·1.3 = 1.17, G0 = 1.0 + 0.9·1.17 = 2.053
    _, ret = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(ret, _t([[2.053, 1.17, 1.3, 2.0]]), rtol=0, atol=1e-12)

    # A truncated rollout bootstraps from V(s_4) = 1.0: δ3 = 2.0 + 0.9 − 0.4 = 2.5, A2 = -0.34 + 0.72·2.5 = 1.46
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8, last_value=_t([1.0]))
    torch.testing.assert_close(adv[0, 2:], _t([1.46, 2.5]), rtol=0, atol=1e-12)


def test_gae_padded_batch_equals_unpadded_rows():
    g = torch.Generator().manual_seed(0)
    T = 9
    spans = [(0, 9), (0, 4), (3, 7), (5, 6)]  # full, right-padded, prompt offset + padding, a single token
    rewards = torch.randn(len(spans), T, generator=g, dtype=D)
    values = torch.randn(len(spans), T, generator=g, dtype=D)
    mask = torch.zeros(len(spans), T, dtype=torch.bool)
    for i, (a, b) in enumerate(spans):
        mask[i, a:b] = True
    # garbage off the mask must not leak in
    rewards_padded = rewards.masked_fill(~mask, float("nan"))
    values_padded = values.masked_fill(~mask, 1e6)
    adv, ret = gae(rewards_padded, values_padded, mask, gamma=0.95, lam=0.9)
    for i, (a, b) in enumerate(spans):
        row_adv, row_ret = gae(rewards[i:i + 1, a:b], values[i:i + 1, a:b], torch.ones(1, b - a, dtype=torch.bool),
                               gamma=0.95, lam=0.9)
        torch.testing.assert_close(adv[i, a:b], row_adv[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(ret[i, a:b], row_ret[0], rtol=0, atol=1e-12)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    # single-token row: A = r − V (terminal)
    torch.testing.assert_close(adv[3, 5], rewards[3, 5] - values[3, 5])


def test_gae_skips_a_hole_in_the_mask():
    # tokens 2-3 are masked (e.g. tool output): the trajectory is tokens 0, 1, 4, 5
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(1, 6, generator=g, dtype=D), torch.randn(1, 6, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    keep = mask[0]
    compact, _ = gae(rewards[:, keep], values[:, keep], torch.ones(1, 4, dtype=torch.bool), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[0, keep], compact[0])


# ---------------------------------------------------------------- clipped policy objective

RATIOS = [1.1, 1.5, 0.5, 1.1, 1.5, 0.5]
ADVS = [2.0, 2.0, 2.0, -2.0, -2.0, -2.0]
# −min(r·A, clip(r, 0.8, 1.2)·A):  r=1.1,A=2: −2.2 | r=1.5,A=2: −min(3.0, 2.4) = −2.4 (clipped)
#   r=0.5,A=2: −min(1.0, 1.6) = −1.0 | r=1.1,A=−2: 2.2 | r=1.5,A=−2: −min(−3.0, −2.4) = 3.0
#   r=0.5,A=−2: −min(−1.0, −1.6) = 1.6 (clipped);  mean = 1.2 / 6 = 0.2
PER_TOKEN = [-2.2, -2.4, -1.0, 2.2, 3.0, 1.6]
CLIPPED = [False, True, False, False, False, True]


def _policy_inputs():
    old = torch.randn(1, 6, generator=torch.Generator().manual_seed(2), dtype=D)
    logp = (old + torch.log(_t([RATIOS]))).requires_grad_(True)
    return logp, old, _t([ADVS]), torch.ones(1, 6, dtype=torch.bool)


def _expected_grad():
    # d loss / d logp_i = −A_i·r_i / N where the unclipped term is the min, 0 where clipping is active
    return _t([[0.0 if c else -a * r / 6 for r, a, c in zip(RATIOS, ADVS, CLIPPED, strict=True)]])


def test_ppo_clipped_objective_value_and_gradient():
    logp, old, adv, mask = _policy_inputs()
    loss, metrics = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, _t(sum(PER_TOKEN) / 6))
    loss.backward()
    grad = logp.grad
    torch.testing.assert_close(grad, _expected_grad(), rtol=0, atol=1e-12)
    assert torch.all(grad[0, torch.tensor(CLIPPED)] == 0)  # exactly zero where clipped
    # gradient of the objective (−loss·N) is A·r on the unclipped tokens
    unclipped = ~torch.tensor(CLIPPED)
    torch.testing.assert_close(-grad[0, unclipped] * 6, (_t(ADVS) * _t(RATIOS))[unclipped])
    torch.testing.assert_close(metrics["clip_frac"], _t(2 / 6))
    torch.testing.assert_close(metrics["ratio"], _t(sum(RATIOS) / 6))


def test_grpo_surrogate_matches_ppo_and_clip_metrics():
    logp, old, adv, mask = _policy_inputs()
    loss, metrics = grpo_loss(logp, old, None, adv, mask, beta=0.0)  # (B, T) advantages
    torch.testing.assert_close(loss, _t(sum(PER_TOKEN) / 6))
    loss.backward()
    torch.testing.assert_close(logp.grad, _expected_grad(), rtol=0, atol=1e-12)
    torch.testing.assert_close(metrics["clip_high"], _t(1 / 6))  # r=1.5, A>0
    torch.testing.assert_close(metrics["clip_low"], _t(1 / 6))  # r=0.5, A<0
    torch.testing.assert_close(metrics["clip_frac"], _t(2 / 6))
    assert "kl" not in metrics


def test_ppo_loss_on_policy_and_padding_safety():
    g = torch.Generator().manual_seed(3)
    logp = torch.randn(2, 5, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    logp = logp.masked_fill(~mask, float("-inf")).requires_grad_(True)  # padding log-probs may be −inf
    old = logp.detach().masked_fill(~mask, float("nan"))
    adv = torch.randn(2, generator=g, dtype=D)  # per-sequence advantages broadcast over tokens
    loss, metrics = ppo_policy_loss(logp, old, adv, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert torch.all(logp.grad[~mask] == 0)
    # r = 1: loss = −mean(A) over tokens; KL(π_old‖π_θ) estimate 0; nothing clipped
    torch.testing.assert_close(loss, -(adv[0] * 3 + adv[1] * 4) / 7)
    assert metrics["approx_kl"] == 0 and metrics["clip_frac"] == 0
    torch.testing.assert_close(metrics["ratio"], _t(1.0))


# ---------------------------------------------------------------- value loss

def test_value_loss_clipping_cases():
    # V_old = 0, ε = 0.2:
    #   V=0.1,  R=1:  inside the clip range: (0.9)² = 0.81, gradient V − R = −0.9
    #   V=0.5,  R=1:  moved past the clip towards R: clipped (0.2 − 1)² = 0.64 > 0.25, gradient 0
    #   V=0.5,  R=0:  moved past the clip away from R: unclipped 0.25 > (0.2)² = 0.04, gradient V − R = 0.5
    #   V=−0.5, R=−1: clipped (−0.2 + 1)² = 0.64 > 0.25, gradient 0
    values = _t([[0.1, 0.5, 0.5, -0.5]]).requires_grad_(True)
    old, returns = torch.zeros(1, 4, dtype=D), _t([[1.0, 1.0, 0.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = value_loss(values, old, returns, mask, clip=0.2)
    torch.testing.assert_close(loss, _t(0.5 * (0.81 + 0.64 + 0.25 + 0.64) / 4))
    loss.backward()
    torch.testing.assert_close(values.grad, _t([[-0.9, 0.0, 0.5, 0.0]]) / 4, rtol=0, atol=1e-12)
    torch.testing.assert_close(metrics["value_clip_frac"], _t(0.5))

    plain, _ = value_loss(values.detach(), old, returns, mask, clip=None)
    torch.testing.assert_close(plain, _t(0.5 * (0.81 + 0.25 + 0.25 + 0.25) / 4))
    # padding is ignored, whatever it holds
    padded = torch.cat([values.detach(), _t([[float("nan")]])], 1)
    loss_pad, _ = value_loss(padded, torch.zeros(1, 5, dtype=D), torch.cat([returns, _t([[5.0]])], 1),
                             torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool))
    torch.testing.assert_close(loss_pad, loss.detach())


# ---------------------------------------------------------------- group normalisation

def test_group_advantages_normalised_per_group():
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(3 * 4, generator=g, dtype=D) * _t([1.0] * 4 + [5.0] * 4 + [0.1] * 4) + 3.0
    adv = group_advantages(rewards, 4, eps=0.0).reshape(3, 4)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3, dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(adv.std(1), torch.ones(3, dtype=D))  # unbiased std, as TRL
    # the default eps = 1e-4 is added to the std: std(Â) = σ / (σ + eps)
    sigma = rewards.reshape(3, 4).std(1)
    torch.testing.assert_close(group_advantages(rewards, 4).reshape(3, 4).std(1), sigma / (sigma + 1e-4))
    # Dr. GRPO: centred, not scaled
    torch.testing.assert_close(group_advantages(rewards, 4, scale="none").reshape(3, 4),
                               rewards.reshape(3, 4) - rewards.reshape(3, 4).mean(1, keepdim=True))
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)


def test_group_advantages_degenerate_groups():
    rewards = _t([1.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3, 0.3, 0.0, 1.0, float("nan"), 1.0])
    adv = group_advantages(rewards, 4)
    assert not torch.isnan(adv).any()
    assert torch.all(adv[:4] == 0)  # identical rewards: no signal, no NaN
    assert adv[4:8].abs().max() < 1e-9  # 0.3 is not exact in binary; still ≈ 0
    # a NaN (unscorable) reward gets 0 and stays out of the baseline: group [0, 1, 1] -> mean 2/3, std 1/√3
    torch.testing.assert_close(adv[8:], _t([-2 / 3, 1 / 3, 0.0, 1 / 3]) / (1 / math.sqrt(3) + 1e-4))
    assert torch.all(group_advantages(_t([0.2, 0.9]), 1) == 0)  # G = 1


# ---------------------------------------------------------------- KL estimators

def test_kl_estimators_basic_properties():
    g = torch.Generator().manual_seed(5)
    logp, ref = -torch.rand(1000, generator=g, dtype=D) * 5, -torch.rand(1000, generator=g, dtype=D) * 5
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    assert torch.all(kl_penalty(logp, ref, "k2") >= 0)
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 alone can be negative
    for kind in ("k1", "k2", "k3"):
        assert torch.all(kl_penalty(logp, logp, kind) == 0)
    # k3 keeps precision for nearby policies: (r − 1) − log r ≈ (log r)²/2
    d = torch.tensor([1e-4], dtype=torch.float32)
    torch.testing.assert_close(kl_penalty(torch.zeros(1), d, "k3"), d ** 2 / 2, rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_kl_estimators_monte_carlo_unbiased():
    p = _t([0.5, 0.3, 0.15, 0.05])
    q = _t([0.2, 0.2, 0.3, 0.3])
    exact = float((p * (p / q).log()).sum())  # KL(p‖q) ≈ 0.3862
    n = 200_000
    x = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(6))
    logp, logq = p.log()[x], q.log()[x]
    for kind in ("k1", "k3"):
        per_value = kl_penalty(p.log(), q.log(), kind)  # the estimator's value on each outcome
        mean = float((p * per_value).sum())
        assert mean == pytest.approx(exact, abs=1e-12)  # exact expectation under p: unbiased
        sd = float((p * (per_value - mean) ** 2).sum().sqrt())
        estimate = float(kl_penalty(logp, logq, kind).mean())
        # 4.5 standard errors of an n-sample mean (sd/√n ≈ 1.7e-3 for k1, 1.5e-3 for k3): false-failure odds < 1e-5
        assert abs(estimate - exact) < 4.5 * sd / math.sqrt(n), (kind, estimate, exact)
    # k2 is biased: its expectation ½E[(log p/q)²] ≈ 0.3509 is 0.035 off the KL here, 20× k1's standard error
    k2_mean = float((p * kl_penalty(p.log(), q.log(), "k2")).sum())
    assert abs(k2_mean - exact) > 0.02


# ---------------------------------------------------------------- whitening, masked statistics, rewards

def test_masked_whiten_statistics_and_padding():
    g = torch.Generator().manual_seed(7)
    values = torch.randn(3, 6, generator=g, dtype=D) * 4 + 2
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    values = values.masked_fill(~mask, 123.0)
    out = masked_whiten(values, mask)
    assert torch.all(out[~mask] == 123.0)
    torch.testing.assert_close(out[mask].mean(), _t(0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[mask].std(), _t(1.0))  # unbiased, as TRL's masked_var(unbiased=True)
    torch.testing.assert_close(masked_whiten(values, mask, unbiased=False)[mask].std(unbiased=False), _t(1.0))
    kept = masked_whiten(values, mask, shift_mean=False)
    torch.testing.assert_close(kept[mask].mean(), values[mask].mean())
    torch.testing.assert_close(kept[mask].std(), _t(1.0))
    # golden reference: TRL 0.x trl/core.py masked_whiten (the PPO-era implementation; not in TRL 1.16)
    mean = (values * mask).sum() / mask.sum()
    n = mask.sum().double()
    var = (((values - mean) ** 2) * mask).sum() / n * n / (n - 1)
    torch.testing.assert_close(out[mask], ((values - mean) * torch.rsqrt(var + 1e-8))[mask], rtol=0, atol=1e-12)
    # degenerate masks stay finite
    one = torch.zeros(3, 6, dtype=torch.bool)
    one[1, 2] = True
    assert torch.isfinite(masked_whiten(values, one)).all() and masked_whiten(values, one)[1, 2] == 0
    assert masked_mean(values, torch.zeros_like(mask)) == 0 and masked_var(values, one) == 0


def test_per_token_rewards_score_on_last_response_token():
    logp = _t([[-1.0, -2.0, -0.5, -9.0], [-9.0, -1.0, -1.5, -0.2]])
    ref = _t([[-1.5, -1.0, -0.5, -9.0], [-9.0, -2.0, -1.0, -0.7]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)  # right-padded; prompt offset
    assert last_token_index(mask).tolist() == [2, 3]
    out = per_token_rewards(_t([10.0, 20.0]), logp, ref, mask, beta=0.1)
    # −0.1·(logp − ref) per token; the score on the last response token; 0 off the mask
    torch.testing.assert_close(out, _t([[-0.05, 0.1, 10.0, 0.0], [0.0, -0.1, 0.05, 20.0 - 0.05]]))
    k3 = per_token_rewards(_t([0.0, 0.0]), logp, ref, mask, beta=1.0, kind="k3")
    assert torch.all(k3 <= 0)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_token_rewards(_t([1.0, 1.0]), logp, ref, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), beta=0.1)


def test_entropy_from_logits():
    logits = torch.zeros(2, 3, 7)
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(7)))
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    ent = entropy_from_logits(torch.randn(2, 3, 7), mask)
    assert torch.all(ent[mask == 0] == 0) and torch.all(ent[mask == 1] > 0)
    # −inf logits (masked vocabulary): the remaining 2 equal logits give log 2, with a finite gradient
    masked = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]], requires_grad=True)
    h = entropy_from_logits(masked, chunk_size=1)
    torch.testing.assert_close(h, torch.tensor([math.log(2)]))
    h.sum().backward()
    assert torch.isfinite(masked.grad).all()


def test_grpo_loss_aggregations_and_reference():
    g = torch.Generator().manual_seed(8)
    B, T = 3, 5
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    logp = -torch.rand(B, T, generator=g, dtype=D)
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, generator=g, dtype=D)
    ratio = (logp - old).exp()
    per_tok = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    per_tok = per_tok + 0.04 * ((ref - logp).exp() - (ref - logp) - 1)
    per_tok = per_tok * mask
    lengths = mask.sum(1)
    expected = {"grpo": (per_tok.sum(1) / lengths).mean(), "bnpo": per_tok.sum() / lengths.sum(),
                "dr_grpo": per_tok.sum() / (B * 16)}
    for loss_type, value in expected.items():
        loss, metrics = grpo_loss(logp, old, ref, adv, mask, loss_type=loss_type, max_len=16)
        torch.testing.assert_close(loss, value)
    assert metrics["kl"] > 0
    # β = 0 never touches the reference
    loss0, _ = grpo_loss(logp, old, None, adv, mask, beta=0.0)
    loss_nan, _ = grpo_loss(logp, old, torch.full_like(ref, float("nan")), adv, mask, beta=0.0)
    assert torch.isfinite(loss0) and torch.equal(loss0, loss_nan)
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(logp, old, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="dapo")  # type: ignore[arg-type]
    # on-policy (old_logp=None): value −mean Â per sequence, gradient −Â per token
    lp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, None, None, adv, mask, beta=0.0, loss_type="bnpo")
    loss.backward()
    torch.testing.assert_close(loss, -(adv * lengths).sum() / lengths.sum())
    torch.testing.assert_close(lp.grad, (-adv[:, None] / lengths.sum()).expand(B, T) * mask)


# ---------------------------------------------------------------- parity with TRL 1.16

@pytest.fixture(scope="module")
def trl_mods():
    pytest.importorskip("trl")
    from trl.trainer import grpo_trainer, utils
    return SimpleNamespace(utils=utils, GRPOTrainer=grpo_trainer.GRPOTrainer)


def test_logprobs_and_entropy_match_trl(trl_mods):
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 7, 50, generator=g)
    tokens = torch.randint(0, 50, (3, 7), generator=g)
    theirs = trl_mods.utils.selective_log_softmax(logits, tokens)
    torch.testing.assert_close(token_logprobs(logits, tokens, chunk_size=5), theirs, rtol=0, atol=1e-6)
    theirs_t = trl_mods.utils.selective_log_softmax(logits, tokens, temperature=0.7)
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=0.7), theirs_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), trl_mods.utils.entropy_from_logits(logits),
                               rtol=0, atol=1e-6)


def test_group_advantages_match_trl_formula(trl_mods):
    # GRPOTrainer._generate_and_score_completions, scale_rewards="group" / "batch" / "none", with TRL's nanstd
    g = torch.Generator().manual_seed(10)
    rewards = torch.randn(4 * 6, generator=g)
    rewards[5] = float("nan")
    grouped = rewards.view(-1, 6)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(6, dim=0)
    std_group = trl_mods.utils.nanstd(grouped, dim=1).repeat_interleave(6, dim=0)
    std_batch = trl_mods.utils.nanstd(rewards).expand_as(rewards)
    for scale, theirs in (("std", (rewards - mean) / (std_group + 1e-4)),
                          ("batch", (rewards - mean) / (std_batch + 1e-4)), ("none", rewards - mean)):
        theirs = torch.nan_to_num(theirs, nan=0.0)
        torch.testing.assert_close(group_advantages(rewards, 6, scale=scale), theirs, rtol=0, atol=1e-6)


def _trl_grpo_loss(trainer_cls, logp, old, ref, adv, mask, loss_type, beta, max_len):
    """TRL 1.16's GRPOTrainer._compute_loss on a stub: the model forward returns `logp`; one process, no
    accumulation, token-level importance sampling, no vLLM, no entropy masking/bonus."""
    identity = lambda x, **_: x  # noqa: E731
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(gather=identity, reduce=identity, gather_for_metrics=identity))
    B, T = logp.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return trainer_cls._compute_loss(stub, None, inputs), stub._metrics["train"]


def test_grpo_loss_matches_trl_compute_loss(trl_mods):
    g = torch.Generator().manual_seed(11)
    B, T = 4, 6
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] + [0] * 5], dtype=torch.bool)
    base = -torch.rand(B, T, generator=g) * 3
    old = base + 0.4 * torch.randn(B, T, generator=g)  # ratios well outside [0.8, 1.2] too
    ref = base + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        for beta in (0.0, 0.04):
            ours_lp, theirs_lp = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
            ours, metrics = grpo_loss(ours_lp, old, ref, adv, mask, beta=beta, loss_type=loss_type, max_len=8)
            theirs, their_metrics = _trl_grpo_loss(trl_mods.GRPOTrainer, theirs_lp, old, ref, adv, mask,
                                                   loss_type, beta, 8)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
            ours.backward()
            theirs.backward()
            torch.testing.assert_close(ours_lp.grad, theirs_lp.grad, rtol=0, atol=1e-6)
            assert metrics["clip_frac"] == pytest.approx(their_metrics["clip_ratio/region_mean"][-1], abs=1e-6)
            assert 0 < metrics["clip_frac"] < 1
            if beta:
                assert metrics["kl"] == pytest.approx(their_metrics["kl"][-1], abs=1e-6)
