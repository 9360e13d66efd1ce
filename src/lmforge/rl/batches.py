"""The batch sources of the RL stages: micro-batches of rollouts for `Trainer.fit()`, generated round after round.

`GRPOBatches`: each generation round takes P prompts, samples G completions each, scores them, normalises rewards
within each group (`group_advantages`), shuffles the P·G rows into micro-batches, computes old log-probs (when a
rollout serves more than one update) and reference log-probs (β > 0), and serves the micro-batches `num_iterations`
times (μ in the GRPO paper) before generating again.

`PPOBatches`: each round samples one completion per prompt, scores it, computes the sampling policy's and the
reference's per-token log-probs and the value head's values, per-token rewards and GAE advantages, and serves the
micro-batches `ppo_epochs` times.

Each owns a `Rounds` (`rl.rounds`) and delegates to it the serving, the epoch and the state: the prompt position,
the round counter and the round in progress, so resume continues at the exact micro-batch even mid-round. Making a
round is each source's own public `make_round`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .rollouts import (IGNORE, Rollouts, SamplingConfig, Scorer, collate_rollouts, derive_seed, sample_rollouts,
                       score_rollouts, sequence_logprobs)
from .rounds import RolloutBuffer, Rounds

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

__all__ = ["GRPOBatches", "PPOBatches"]

log = logging.getLogger(__name__)

Autocast = Callable[[], contextlib.AbstractContextManager]
"""A factory of the trainer's precision context, e.g. `functools.partial(precision.autocast, "bf16", device)`."""


class GRPOBatches:
    """The GRPO batch source (see the module docstring): `next_batch()` gives micro-batches of rollouts with
    input_ids, attention_mask, labels, advantages (B,), rewards (B,), old_logps (B, T) when needed, ref_logps
    (B, T) when β > 0, and the round's statistics as `rollout/<name>` scalars.

    A round holds P·G rollouts (P = `prompts_per_round` per process, G = `group_size`), split into micro-batches of
    `micro_batch`; it must fill whole optimizer steps of `grad_accum` micro-batches, so each round is
    P·G / (micro_batch · grad_accum) · num_iterations optimizer steps. Old log-probs are computed only when a
    rollout is used after the weights moved (num_iterations > 1 or several steps per round); otherwise the loss
    takes the ratio as exactly 1 (TRL does the same). `rewards` is a `Rewards` (or anything with its `score` and
    `names`)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                 records: Sequence[dict[str, Any]], rewards: Scorer, *, group_size: int = 8, prompts_per_round: int = 8,
                 num_iterations: int = 1, micro_batch: int = 8, grad_accum: int = 1,
                 sampling: SamplingConfig | None = None, beta: float = 0.0, scale_rewards: str = "std", seed: int = 0,
                 rank: int = 0, world: int = 1, autocast: Autocast = contextlib.nullcontext,
                 ref_model: nn.Module | None = None):
        n = prompts_per_round * group_size
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare completions of the same prompt), found "
                             f"{group_size}")
        if prompts_per_round < 1 or num_iterations < 1:
            raise ValueError(f"prompts_per_round and num_iterations must be >= 1, found {prompts_per_round} and "
                             f"{num_iterations}")
        if n % (micro_batch * grad_accum):
            raise ValueError(f"a round of prompts_per_round x group_size = {prompts_per_round} x {group_size} = {n} "
                             f"rollouts must fill whole optimizer steps of micro_batch x grad_accum = {micro_batch} x "
                             f"{grad_accum} rows; change one of them")
        if len(prompts) != len(records):
            raise ValueError(f"{len(prompts)} prompts but {len(records)} records")
        self.model, self.tokenizer, self.prompts, self.records = model, tokenizer, list(prompts), list(records)
        self.rewards, self.group_size, self.per_round = rewards, group_size, prompts_per_round
        self.num_iterations, self.micro_batch, self.grad_accum = num_iterations, micro_batch, grad_accum
        self.sampling = sampling or SamplingConfig()
        self.beta, self.scale_rewards, self.seed = beta, scale_rewards, seed
        self.rank, self.autocast, self.ref_model = rank, autocast, ref_model
        self.pad_id = tokenizer.padding_id
        self.rounds = Rounds(len(self.prompts), num_iterations, seed, rank, world)
        self.steps_per_round = n // (micro_batch * grad_accum) * num_iterations
        self.needs_old_logps = num_iterations > 1 or n > micro_batch * grad_accum

    # ---- the batch-source protocol, served by `rounds`
    def next_batch(self) -> dict[str, Tensor]:
        return self.rounds.next_batch(self.make_round)

    @property
    def epoch(self) -> float:
        return self.rounds.epoch

    @property
    def buffer(self) -> RolloutBuffer:
        return self.rounds.buffer

    @property
    def last_stats(self) -> dict[str, float]:
        return self.rounds.last_stats

    def state_dict(self) -> dict[str, Any]:
        return self.rounds.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds.load_state_dict(state)

    # ---- the round
    def _generate(self) -> Rollouts:
        """Sample and score one round: the next P prompts, G completions each, seeds from (seed, rank, round)."""
        idx = self.rounds.source.take(self.per_round)
        seeds = [derive_seed("rollout", self.seed, self.rank, self.rounds.round, k)
                 for k in range(len(idx) * self.group_size)]
        ro = sample_rollouts(self.model, self.tokenizer, [self.prompts[i] for i in idx],
                             [self.records[i] for i in idx], self.group_size, self.sampling, seeds)
        return score_rollouts(ro, self.rewards)

    def make_round(self) -> None:
        """Generate the next round and fill the buffer with its micro-batches (advantages, log-probs, statistics)."""
        from ..objectives.rl import group_advantages

        ro = self._generate()
        advantages = group_advantages(ro.rewards, self.group_size, self.scale_rewards)  # (N,)
        gen = torch.Generator().manual_seed(derive_seed("shuffle", self.seed, self.rank, self.rounds.round))
        order = torch.randperm(len(ro), generator=gen).tolist()
        batches = []
        for a in range(0, len(order), self.micro_batch):
            rows = order[a:a + self.micro_batch]
            b = collate_rollouts([ro.prompt_ids[i] for i in rows], [ro.completion_ids[i] for i in rows], self.pad_id)
            b["advantages"] = advantages[rows]
            b["rewards"] = ro.rewards[rows]
            batches.append(b)
        start = time.perf_counter()
        self._logprobs(batches)
        stats = ro.stats(self.rewards.names)
        stats.update(logp_s=time.perf_counter() - start, round=float(self.rounds.round))
        self.rounds.finish(batches, stats)
        log.info("round %d: reward %.3f ± %.3f, %.0f completion tokens/s, zero-std groups %.2f", self.rounds.round,
                 stats["reward_mean"], stats["reward_std"], stats["tokens_per_s"], stats["zero_std_groups"])

    def _logprobs(self, batches: list[dict[str, Tensor]]) -> None:
        """Old (sampling policy) and reference log-probs of each micro-batch, in the trainer's precision."""
        if not (self.needs_old_logps or self.beta):
            return
        from ..objectives.preference import adapters_disabled

        with self.autocast():
            for b in batches:
                if self.needs_old_logps:
                    b["old_logps"] = sequence_logprobs(self.model, b, self.sampling.temperature)
                if self.beta:
                    if self.ref_model is not None:
                        b["ref_logps"] = sequence_logprobs(self.ref_model, b, self.sampling.temperature)
                    else:
                        with adapters_disabled(self.model):
                            b["ref_logps"] = sequence_logprobs(self.model, b, self.sampling.temperature)


class PPOBatches:
    """The PPO batch source (RLHF as in Ziegler et al. 2019 and InstructGPT): each round samples one completion for
    each of P prompts from the current policy, scores it (reward functions, or a reward model through the
    `reward_model` reward), and computes without gradients the sampling policy's and the reference's per-token
    log-probs and the value head's values; per-token rewards are −β·KL(π‖π_ref) with the score added on the last
    completion token (`per_token_rewards`), advantages and returns come from GAE, advantages are whitened over the
    round, and the round's micro-batches are served `ppo_epochs` times (minibatch epochs) before sampling again.

    With `kl_target`, β follows the adaptive controller of Ziegler et al. 2019 §2.2: after each round β ←
    β·(1 + clip(KL/target − 1, −0.2, 0.2)·N/horizon), N the round's rollouts. The round in progress and β are part
    of the state, so resume continues at the exact micro-batch."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                 records: Sequence[dict[str, Any]], rewards: Scorer, *, prompts_per_round: int = 16,
                 ppo_epochs: int = 2, micro_batch: int = 8, grad_accum: int = 1, sampling: SamplingConfig | None = None,
                 beta: float = 0.05, kl_target: float | None = None, kl_horizon: int = 10000, gamma: float = 1.0,
                 lam: float = 0.95, whiten: bool = True, seed: int = 0, rank: int = 0, world: int = 1,
                 autocast: Autocast = contextlib.nullcontext, ref_model: nn.Module | None = None):
        if prompts_per_round % (micro_batch * grad_accum):
            raise ValueError(f"prompts_per_round {prompts_per_round} must fill whole optimizer steps of micro_batch "
                             f"x grad_accum = {micro_batch} x {grad_accum} rows")
        if ppo_epochs < 1 or beta < 0 or (kl_target is not None and kl_target <= 0):
            raise ValueError(f"need ppo_epochs >= 1, beta >= 0 and kl_target > 0 or null; found {ppo_epochs}, {beta}, "
                             f"{kl_target}")
        self.model, self.tokenizer, self.prompts, self.records = model, tokenizer, list(prompts), list(records)
        self.rewards, self.per_round, self.micro_batch = rewards, prompts_per_round, micro_batch
        self.sampling = sampling or SamplingConfig()
        self.beta, self.kl_target, self.kl_horizon = beta, kl_target, kl_horizon
        self.gamma, self.lam, self.whiten, self.seed, self.rank = gamma, lam, whiten, seed, rank
        self.autocast, self.ref_model = autocast, ref_model
        self.pad_id = tokenizer.padding_id
        self.rounds = Rounds(len(self.prompts), ppo_epochs, seed, rank, world)
        self.steps_per_round = prompts_per_round // (micro_batch * grad_accum) * ppo_epochs

    # ---- the batch-source protocol, served by `rounds` (β is part of the state)
    def next_batch(self) -> dict[str, Tensor]:
        return self.rounds.next_batch(self.make_round)

    @property
    def epoch(self) -> float:
        return self.rounds.epoch

    @property
    def buffer(self) -> RolloutBuffer:
        return self.rounds.buffer

    @property
    def last_stats(self) -> dict[str, float]:
        return self.rounds.last_stats

    def state_dict(self) -> dict[str, Any]:
        return {**self.rounds.state_dict(), "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds.load_state_dict(state)
        self.beta = float(state["beta"])

    # ---- the round
    def make_round(self) -> None:
        """Sample and score the next round, compute its log-probs, values, rewards and advantages, fill the buffer
        and adapt β."""
        from ..objectives.rl import gae, per_token_rewards

        idx = self.rounds.source.take(self.per_round)
        seeds = [derive_seed("ppo", self.seed, self.rank, self.rounds.round, k) for k in range(len(idx))]
        ro = sample_rollouts(self.model, self.tokenizer, [self.prompts[i] for i in idx],
                             [self.records[i] for i in idx], 1, self.sampling, seeds)
        start = time.perf_counter()
        scores, _ = self.rewards.score(ro.texts, ro.records)
        ro.rewards = scores
        scores = scores.nan_to_num(0.0)  # a completion no reward could score counts 0
        score_s = time.perf_counter() - start
        gen = torch.Generator().manual_seed(derive_seed("shuffle", self.seed, self.rank, self.rounds.round))
        order = torch.randperm(len(ro), generator=gen).tolist()
        batches, kls = [], []
        start = time.perf_counter()
        for a in range(0, len(order), self.micro_batch):
            rows = order[a:a + self.micro_batch]
            b = collate_rollouts([ro.prompt_ids[i] for i in rows], [ro.completion_ids[i] for i in rows], self.pad_id)
            mask = b["labels"] != IGNORE  # (B, T)
            b["old_logps"], b["old_values"], ref = self._policy_pass(b)
            rewards = per_token_rewards(scores[rows], b["old_logps"], ref, mask, self.beta)  # (B, T)
            b["advantages"], b["returns"] = gae(rewards, b["old_values"], mask, self.gamma, self.lam)
            b["scores"] = scores[rows]
            kls.append(torch.where(mask, b["old_logps"] - ref, 0).sum(-1))  # (B,) k1 KL of each completion
            batches.append(b)
        if self.whiten:  # over the whole round, not per micro-batch
            flat = torch.cat([b["advantages"][b["labels"] != IGNORE] for b in batches])  # (completion tokens,)
            mean, std = flat.mean(), (flat.std() if flat.numel() > 1 else flat.new_ones(()))
            for b in batches:
                b["advantages"] = torch.where(b["labels"] != IGNORE, (b["advantages"] - mean) / (std + 1e-8), 0)
        kl = torch.cat(kls).mean().item()
        stats = ro.stats()
        stats.update(score_mean=scores.mean().item(), kl=kl, beta=self.beta, score_s=score_s,
                     logp_s=time.perf_counter() - start, round=float(self.rounds.round))
        self.rounds.finish(batches, stats)
        self._adapt_beta(kl, len(ro))
        log.info("ppo round %d: score %.3f, KL %.3f, beta %.4f, %.0f completion tokens/s", self.rounds.round,
                 stats["score_mean"], kl, self.beta, stats["tokens_per_s"])

    def _adapt_beta(self, kl: float, n: int) -> None:
        """Ziegler et al. 2019 §2.2: β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n/horizon); fixed without a target."""
        if self.kl_target is not None:
            error = max(-0.2, min(0.2, kl / self.kl_target - 1))
            self.beta *= 1 + error * n / self.kl_horizon

    @torch.no_grad()
    def _policy_pass(self, b: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(old log-probs, old values, reference log-probs), each (B, T) float32 on the CPU, 0 off the labels."""
        from ..objectives.preference import adapters_disabled
        from ..objectives.rl import policy_and_values

        dev = next(self.model.parameters()).device
        ids, att, labels = b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev)
        full = lambda x, cols: torch.zeros(labels.shape, dtype=torch.float32, device=dev).index_copy_(  # noqa: E731
            1, cols, x.float()).cpu()
        with self.autocast():  # the mode and precision of the training forward, so the first ratio is 1
            logp, values, _, cols, _ = policy_and_values(self.model, ids, att, labels, self.sampling.temperature)
            if self.ref_model is not None:
                ref = sequence_logprobs(self.ref_model, b, self.sampling.temperature)
            else:
                with adapters_disabled(self.model):
                    ref = sequence_logprobs(self.model, b, self.sampling.temperature)
        return full(logp, cols), full(values, cols), ref
