"""Rollouts for the RL stages: batches of completions sampled from the model being trained, for `Trainer.fit()`.

The parts, separable so PPO reuses all but the last:
- `PromptSource`: prompt indices in seeded epochs, resumable (its state is a counter);
- `encode_prompts`: prompt records rendered with the chat template (or as plain text);
- `sample_rollouts`: G completions per prompt from the inference engine, with per-request seeds (so a round is
  reproducible), on the model's current weights (a fresh engine each round: no stale prefix cache; LoRA layers and
  train mode restored afterwards, see `generation_mode`); `score_rollouts` scores them (`objectives.rewards`);
- `collate_rollouts` + `sequence_logprobs`: right-padded (prompt + completion) rows with labels on the completion,
  and their per-token log-probs under a model (the sampling policy's "old" ones, the reference's);
- `RolloutBuffer`: a round's micro-batches served `num_iterations` times, with the unfinished round in its state;
- `GRPOBatches`: the GRPO batch source. Each generation round takes P prompts, samples G completions each, scores
  them, normalises rewards within each group (`group_advantages`), shuffles the P·G rows into micro-batches,
  computes old log-probs (when a rollout serves more than one update) and reference log-probs (β > 0), and serves
  the micro-batches `num_iterations` times (μ in the GRPO paper) before generating again. The round in progress is
  part of its state, so resume continues at the exact micro-batch even mid-round.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..inference.sampling import SamplingParams

__all__ = ["SamplingConfig", "PromptSource", "Rollouts", "encode_prompt", "encode_prompts", "generation_mode",
           "sample_rollouts", "score_rollouts", "collate_rollouts", "sequence_logprobs", "precision_context",
           "RolloutBuffer", "RoundSource", "tensor_to_json", "tensor_from_json", "derive_seed", "GRPOBatches",
           "PPOBatches", "prompt_room", "reward_evaluator"]

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class SamplingConfig:
    """How completions are sampled from the policy."""

    temperature: float = 1.0
    """Sampling temperature (> 0); log-probs for the loss use the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    max_new_tokens: int = 128
    """Longest completion in tokens."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a completion (besides the end-of-sequence token)."""

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (RL samples; greedy decoding gives identical completions), "
                             f"found {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError(f"expected 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1, found top_p={self.top_p}, "
                             f"top_k={self.top_k}, max_new_tokens={self.max_new_tokens}")

    def params(self, seed: int | None, greedy: bool = False) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0 if greedy else self.temperature,
                              top_p=1.0 if greedy else self.top_p, top_k=0 if greedy else self.top_k, seed=seed,
                              stop=tuple(self.stop))


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any values (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PromptSource:
    """Indices into `n` prompts in epochs of a permutation seeded by (seed, epoch); each process takes its own share
    of every global draw. Its state is one counter, so resume continues at the exact prompt."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("no prompts")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.pos = 0  # global prompts drawn
        self._perm: tuple[int, list[int]] | None = None

    def _index(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(derive_seed("prompts", self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=gen).tolist())
        return self._perm[1][i]

    def take(self, k: int) -> list[int]:
        """This process's k prompt indices of the next global draw of k · world."""
        start = self.pos + self.rank * k
        self.pos += k * self.world
        return [self._index(g) for g in range(start, start + k)]

    @property
    def epoch(self) -> float:
        return self.pos / self.n

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "seed": self.seed, "prompts": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["prompts"] != self.n:
            raise ValueError(f"prompt state of another run (seed {state['seed']}, {state['prompts']} prompts) cannot "
                             f"resume this one (seed {self.seed}, {self.n} prompts)")
        self.pos = int(state["pos"])


def encode_prompt(tokenizer, record: dict[str, Any], chat: bool = True) -> list[int]:
    """Token ids of a prompt record (`data.preference.read_prompts`): its `messages` through the chat template
    with the generation prompt (`chat`), or its `prompt` string as it is."""
    if not chat:
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{record.get('where', 'a prompt record')}: a message-list prompt needs chat: true")
        return tokenizer.encode(record["prompt"])
    from ..tokenizer.chat import encode_chat

    return encode_chat(tokenizer, record["messages"], add_generation_prompt=True).ids


def encode_prompts(tokenizer, records: Sequence[dict[str, Any]], chat: bool, max_length: int) -> list[list[int]]:
    """`encode_prompt` for every record, keeping the last `max_length` tokens of longer prompts (counted, logged)."""
    out, cut = [], 0
    for r in records:
        ids = encode_prompt(tokenizer, r, chat)
        if len(ids) > max_length:
            ids, cut = ids[-max_length:], cut + 1
        out.append(ids)
    if cut:
        log.warning("%d of %d prompts were longer than %d tokens and lost their beginning", cut, len(records),
                    max_length)
    return out


@contextlib.contextmanager
def generation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Use `model` with the inference engine while it is being trained: the engine puts the model in eval mode;
    train mode is put back afterwards (the engine itself restores the LoRA layers' routing after each pass)."""
    training = model.training
    try:
        yield model
    finally:
        model.train(training)


@dataclass
class Rollouts:
    """One generation round: `group_size` completions for each prompt, prompt-major (completion i belongs to
    prompt i // group_size), with their rewards once scored."""

    prompt_ids: list[list[int]]
    """Prompt tokens of each completion (repeated within a group)."""
    completion_ids: list[list[int]]
    """Sampled tokens, the end-of-sequence token included when it was sampled."""
    texts: list[str]
    """Decoded completions (cut before a stop string), what the rewards read."""
    finish_reasons: list[str]
    """stop (end of sequence or stop string) or length (max_new_tokens reached)."""
    records: list[dict[str, Any]]
    """The prompt record of each completion (repeated within a group)."""
    group_size: int
    seconds: float = 0.0
    """Wall-clock time of sampling."""
    rewards: Tensor | None = None
    """(N,) weighted reward sum (NaN: no reward function could score it)."""
    reward_parts: Tensor | None = None
    """(N, K) each reward function's value."""
    sample_logprobs: list[list[float]] | None = None
    """The engine's log-prob of each sampled token (before temperature), when asked for."""
    score_seconds: float = 0.0
    """Wall-clock time of scoring."""

    def __len__(self) -> int:
        return len(self.completion_ids)

    def stats(self, names: Sequence[str] = ()) -> dict[str, float]:
        """Round statistics: reward mean / std (and per function), the share of groups whose rewards are all equal
        (no learning signal), completion lengths, the share cut at max_new_tokens, sampling tokens/s."""
        lengths = torch.tensor([len(c) for c in self.completion_ids], dtype=torch.float32)
        out = {"completion_len": lengths.mean().item(), "completion_len_max": lengths.max().item(),
               "truncated": sum(r == "length" for r in self.finish_reasons) / len(self),
               "tokens_per_s": lengths.sum().item() / max(self.seconds, 1e-9), "sample_s": self.seconds,
               "score_s": self.score_seconds}
        if self.rewards is not None:
            r = self.rewards
            grouped = r.reshape(-1, self.group_size)  # (P, G)
            valid = ~r.isnan()
            out["reward_mean"] = r[valid].mean().item() if valid.any() else float("nan")
            out["reward_std"] = r[valid].std().item() if valid.sum() > 1 else 0.0
            span = grouped.nan_to_num(0).amax(1) - grouped.nan_to_num(0).amin(1)
            out["zero_std_groups"] = (span == 0).float().mean().item()
            if self.reward_parts is not None and len(names) > 1:
                for k, name in enumerate(names):
                    out[f"reward/{name}"] = torch.nanmean(self.reward_parts[:, k]).item()
        return out


def _engine_config(model: nn.Module, n: int, longest: int):
    """Engine limits for one round of n sequences of at most `longest` tokens: KV blocks for all of them."""
    from ..inference.engine import EngineConfig
    from ..inference.paged import PagedKVCache

    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    bs = 16
    tokens = n * (-(-longest // bs) + 1) * bs
    gb = tokens * PagedKVCache.bytes_per_token(model.cfg, dtype) / 2**30
    return EngineConfig(block_size=bs, kv_cache_gb=max(gb, 1e-3), max_running=max(1, min(n, 256)))


def sample_rollouts(model: nn.Module, tokenizer, prompts: Sequence[list[int]], records: Sequence[dict[str, Any]],
                    group_size: int, sampling: SamplingConfig, seeds: Sequence[int] | None = None,
                    greedy: bool = False, logprobs: bool = False) -> Rollouts:
    """`group_size` completions of each prompt (prompt-major) from the model's current weights. Completion j of
    prompt i uses seed `seeds[i * group_size + j]`, so the same seeds and weights give the same round, whatever
    else runs. A fresh engine each call: its prefix cache must not outlive a weight update. `logprobs` keeps the
    engine's log-prob of each sampled token (`Rollouts.sample_logprobs`)."""
    from ..inference.engine import Engine

    n = len(prompts) * group_size
    seeds = list(seeds) if seeds is not None else [None] * n
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} completions")
    ids = [list(p) for p in prompts for _ in range(group_size)]
    params = [sampling.params(s, greedy) for s in seeds]
    if logprobs:
        for p in params:
            p.logprobs = 0
    longest = max(len(p) for p in ids) + sampling.max_new_tokens
    start = time.perf_counter()
    with generation_mode(model), torch.no_grad():
        engine = Engine(model, tokenizer, _engine_config(model, n, longest))
        outs = engine.generate(ids, params)
        del engine
    seconds = time.perf_counter() - start
    return Rollouts(ids, [list(o.token_ids) for o in outs], [o.text for o in outs],
                    [o.finish_reason or "stop" for o in outs], [r for r in records for _ in range(group_size)],
                    group_size, seconds,
                    sample_logprobs=[[lp.logprob for lp in o.logprobs] for o in outs] if logprobs else None)


def prompt_room(max_prompt_length: int, max_new_tokens: int, context: int) -> int:
    """Longest prompt that leaves room for max_new_tokens in the model's context."""
    from ..config import ConfigError

    room = min(max_prompt_length, context - max_new_tokens)
    if room < 1:
        raise ConfigError(f"sampling.max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                          f"context of {context} tokens")
    return room


def reward_evaluator(tok, prompts: list[list[int]], records: list[dict[str, Any]], rewards,
                     sampling: SamplingConfig) -> Callable[[Any], dict[str, float]]:
    """The trainer's evaluation hook of the RL stages: the mean reward of greedy answers to held-out prompts."""

    def evaluate(model) -> dict[str, float]:
        ro = sample_rollouts(model, tok, prompts, records, 1, sampling, greedy=True)
        total, parts = rewards.score(ro.texts, ro.records)
        out = {"val_reward": torch.nanmean(total).item(), "val_completion_len": ro.stats()["completion_len"]}
        if len(rewards.names) > 1:
            out.update({f"val_reward/{n}": torch.nanmean(parts[:, k]).item() for k, n in enumerate(rewards.names)})
        return out

    return evaluate


def score_rollouts(rollouts: Rollouts, rewards) -> Rollouts:
    """Fill `rollouts.rewards` / `reward_parts` with `rewards.score(texts, records)` (a `Rewards`, or anything with
    that method returning (total (N,), parts (N, K))); returns the rollouts."""
    start = time.perf_counter()
    rollouts.rewards, rollouts.reward_parts = rewards.score(rollouts.texts, rollouts.records)
    rollouts.score_seconds = time.perf_counter() - start
    return rollouts


def collate_rollouts(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
                     pad_id: int) -> dict[str, Tensor]:
    """Right-padded rows prompt + completion: input_ids, attention_mask (B, T) and labels (B, T) holding each
    completion token at the position that predicts it (labels are shifted, −100 elsewhere)."""
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    b, t = len(lengths), max(lengths)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        row = list(p) + list(c)
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        if c:
            labels[i, len(p) - 1:len(row) - 1] = torch.tensor(c)  # position t predicts token t + 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def sequence_logprobs(model: nn.Module, batch: dict[str, Tensor], temperature: float = 1.0) -> Tensor:
    """(B, T) float32 log-probs of the labels of a collated batch under `model` (0 where there is no label), in
    the model's current mode; the batch's tensors are moved to the model's device and the result back to CPU."""
    from ..objectives.rl import completion_token_logprobs

    dev = next(model.parameters()).device
    labels = batch["labels"].to(dev)
    logp, _, cols, _ = completion_token_logprobs(model, batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                                                 labels, temperature)
    full = torch.zeros(labels.shape, dtype=torch.float32, device=dev)
    full[:, cols] = logp.float()
    return full.cpu()


def precision_context(precision: str, device: torch.device | str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context the trainer uses for `precision` (so log-probs computed here match)."""
    dev = torch.device(device).type

    def make():
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(dev, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)

    return make


def tensor_to_json(t: Tensor) -> dict[str, Any]:
    """A tensor as JSON-safe data (dtype, shape, base64 of its bytes): exact, compact, no pickle."""
    t = t.detach().cpu().contiguous()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(t.numpy().tobytes()).decode()}


def tensor_from_json(d: dict[str, Any]) -> Tensor:
    dtype = getattr(torch, d["dtype"])
    raw = base64.b64decode(d["data"])
    if not raw:
        return torch.empty(d["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(d["shape"]).clone()


class RolloutBuffer:
    """The micro-batches of one round, served `num_iterations` times in order (batch 0, 1, …, n−1, 0, 1, …; TRL's
    order). Its state holds the unfinished round itself: the rollouts and their old log-probs were made with weights
    that no longer exist when a run resumes, so they are saved rather than regenerated."""

    def __init__(self, num_iterations: int = 1):
        self.num_iterations = num_iterations
        self.batches: list[dict[str, Tensor]] = []
        self.served = 0  # micro-batches served from this round, over all iterations

    @property
    def exhausted(self) -> bool:
        return self.served >= len(self.batches) * self.num_iterations

    def fill(self, batches: list[dict[str, Tensor]]) -> None:
        self.batches, self.served = batches, 0

    def next(self) -> dict[str, Tensor]:
        if self.exhausted:
            raise IndexError("the round is used up; fill the buffer with the next round first")
        batch = self.batches[self.served % len(self.batches)]
        self.served += 1
        return dict(batch)

    def state_dict(self) -> dict[str, Any]:
        if self.exhausted:
            return {"served": 0, "batches": []}
        return {"served": self.served, "batches": [{k: tensor_to_json(v) for k, v in b.items()} for b in self.batches]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = [{k: tensor_from_json(v) for k, v in b.items()} for b in state["batches"]]
        self.served = int(state["served"]) if self.batches else 0


class RoundSource:
    """The batch-source protocol of the RL stages (`Trainer.fit()` calls `next_batch`, `state_dict`,
    `load_state_dict`, reads `epoch`): micro-batches served from `buffer`, a new generation round (`_make_round`)
    when it runs out. The state is JSON-safe: the prompt position, the round counter, the unfinished round."""

    source: PromptSource
    buffer: RolloutBuffer
    round: int
    last_stats: dict[str, float]

    def _make_round(self) -> None:
        raise NotImplementedError

    def next_batch(self) -> dict[str, Tensor]:
        if self.buffer.exhausted:
            self._make_round()
        return self.buffer.next()

    @property
    def epoch(self) -> float:
        return self.source.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "round": self.round, "buffer": self.buffer.state_dict(),
                "last_stats": self.last_stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state["source"])
        self.round = int(state["round"])
        self.buffer.load_state_dict(state["buffer"])
        self.last_stats = dict(state.get("last_stats", {}))


class GRPOBatches(RoundSource):
    """The GRPO batch source (see the module docstring): `next_batch()` gives micro-batches of rollouts with
    input_ids, attention_mask, labels, advantages (B,), rewards (B,), old_logps (B, T) when needed, ref_logps
    (B, T) when β > 0, and the round's statistics as `rollout/<name>` scalars.

    A round holds P·G rollouts (P = `prompts_per_round` per process, G = `group_size`), split into micro-batches of
    `micro_batch`; it must fill whole optimizer steps of `grad_accum` micro-batches, so each round is
    P·G / (micro_batch · grad_accum) · num_iterations optimizer steps. Old log-probs are computed only when a
    rollout is used after the weights moved (num_iterations > 1 or several steps per round); otherwise the loss
    takes the ratio as exactly 1 (TRL does the same). `rewards` is a `Rewards` (or anything with its `score` and
    `names`)."""

    def __init__(self, model: nn.Module, tokenizer, prompts: Sequence[list[int]], records: Sequence[dict[str, Any]],
                 rewards, *, group_size: int = 8, prompts_per_round: int = 8, num_iterations: int = 1,
                 micro_batch: int = 8, grad_accum: int = 1, sampling: SamplingConfig | None = None, beta: float = 0.0,
                 scale_rewards: str = "std", seed: int = 0, rank: int = 0, world: int = 1,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
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
        self.pad_id = (tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id) or 0
        self.source = PromptSource(len(self.prompts), seed, rank, world)
        self.round = 0  # rounds generated so far
        self.buffer = RolloutBuffer(num_iterations)
        self.last_stats: dict[str, float] = {}
        self.steps_per_round = n // (micro_batch * grad_accum) * num_iterations
        self.needs_old_logps = num_iterations > 1 or n > micro_batch * grad_accum

    # ---- the round
    def _generate(self) -> Rollouts:
        """Sample and score one round: the next P prompts, G completions each, seeds from (seed, rank, round)."""
        idx = self.source.take(self.per_round)
        seeds = [derive_seed("rollout", self.seed, self.rank, self.round, k) for k in range(len(idx) * self.group_size)]
        ro = sample_rollouts(self.model, self.tokenizer, [self.prompts[i] for i in idx],
                             [self.records[i] for i in idx], self.group_size, self.sampling, seeds)
        return score_rollouts(ro, self.rewards)

    def _make_round(self) -> None:
        from ..objectives.rl import group_advantages

        ro = self._generate()
        advantages = group_advantages(ro.rewards, self.group_size, self.scale_rewards)  # (N,)
        gen = torch.Generator().manual_seed(derive_seed("shuffle", self.seed, self.rank, self.round))
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
        stats.update(logp_s=time.perf_counter() - start, round=float(self.round))
        for b in batches:
            b.update({f"rollout/{k}": torch.tensor(v, dtype=torch.float32) for k, v in stats.items()})
        self.buffer.fill(batches)
        self.last_stats = stats
        self.round += 1
        log.info("round %d: reward %.3f ± %.3f, %.0f completion tokens/s, zero-std groups %.2f", self.round,
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



class PPOBatches(RoundSource):
    """The PPO batch source (RLHF as in Ziegler et al. 2019 and InstructGPT): each round samples one completion for
    each of P prompts from the current policy, scores it (reward functions, or a reward model through the
    `reward_model` reward), and computes without gradients the sampling policy's and the reference's per-token
    log-probs and the value head's values; per-token rewards are −β·KL(π‖π_ref) with the score added on the last
    completion token (`per_token_rewards`), advantages and returns come from GAE, advantages are whitened over the
    round, and the round's micro-batches are served `ppo_epochs` times (minibatch epochs) before sampling again.

    With `kl_target`, β follows the adaptive controller of Ziegler et al. 2019 §2.2: after each round β ←
    β·(1 + clip(KL/target − 1, −0.2, 0.2)·N/horizon), N the round's rollouts. The round in progress and β are part
    of the state, so resume continues at the exact micro-batch."""

    def __init__(self, model: nn.Module, tokenizer, prompts: Sequence[list[int]], records: Sequence[dict[str, Any]],
                 rewards, *, prompts_per_round: int = 16, ppo_epochs: int = 2, micro_batch: int = 8,
                 grad_accum: int = 1, sampling: SamplingConfig | None = None, beta: float = 0.05,
                 kl_target: float | None = None, kl_horizon: int = 10000, gamma: float = 1.0, lam: float = 0.95,
                 whiten: bool = True, seed: int = 0, rank: int = 0, world: int = 1,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 ref_model: nn.Module | None = None):
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
        self.pad_id = (tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id) or 0
        self.source = PromptSource(len(self.prompts), seed, rank, world)
        self.round = 0
        self.buffer = RolloutBuffer(ppo_epochs)
        self.last_stats: dict[str, float] = {}
        self.steps_per_round = prompts_per_round // (micro_batch * grad_accum) * ppo_epochs

    def _make_round(self) -> None:
        from ..objectives.rl import gae, per_token_rewards

        idx = self.source.take(self.per_round)
        seeds = [derive_seed("ppo", self.seed, self.rank, self.round, k) for k in range(len(idx))]
        ro = sample_rollouts(self.model, self.tokenizer, [self.prompts[i] for i in idx],
                             [self.records[i] for i in idx], 1, self.sampling, seeds)
        start = time.perf_counter()
        scores, _ = self.rewards.score(ro.texts, ro.records)
        ro.rewards = scores
        scores = scores.nan_to_num(0.0)  # a completion no reward could score counts 0
        score_s = time.perf_counter() - start
        gen = torch.Generator().manual_seed(derive_seed("shuffle", self.seed, self.rank, self.round))
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
                     logp_s=time.perf_counter() - start, round=float(self.round))
        for b in batches:
            b.update({f"rollout/{k}": torch.tensor(v, dtype=torch.float32) for k, v in stats.items()})
        self.buffer.fill(batches)
        self.last_stats = stats
        self.round += 1
        self._adapt_beta(kl, len(ro))
        log.info("ppo round %d: score %.3f, KL %.3f, beta %.4f, %.0f completion tokens/s", self.round,
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

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.beta = float(state["beta"])
