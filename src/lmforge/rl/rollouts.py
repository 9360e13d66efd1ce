"""Rollouts for the RL stages: completions sampled from the model being trained, scored, and laid out as rows.

- `encode_prompts`: prompt records (`data.prompts.read_prompts`) rendered with the chat template (or as plain text);
- `sample_rollouts`: G completions per prompt from the inference engine, with per-request seeds (so a round is
  reproducible), on the model's current weights (a fresh engine each round: no stale prefix cache; LoRA layers and
  train mode restored afterwards, see `generation_mode`); `score_rollouts` scores them (`rl.rewards`);
- `collate_rollouts` + `sequence_logprobs`: right-padded (prompt + completion) rows with labels on the completion,
  and their per-token log-probs under a model (the sampling policy's "old" ones, the reference's);
- `reward_evaluator`: the trainer's held-out evaluation of the RL stages (the mean reward of greedy answers).
The batch sources that put these together round after round are in `rl.batches`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..inference.options import Decoding
from ..inference.sampling import SamplingParams

if TYPE_CHECKING:
    from ..inference.engine import EngineConfig
    from ..tokenizer import Tokenizer

__all__ = ["SamplingConfig", "Scorer", "Rollouts", "derive_seed", "encode_prompt", "encode_prompts",
           "generation_mode", "sample_rollouts", "score_rollouts", "prompt_room", "reward_evaluator",
           "collate_rollouts", "sequence_logprobs"]

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class SamplingConfig(Decoding):
    """How completions are sampled from the policy: the shared decoding keys (temperature > 0) and stop strings."""

    max_new_tokens: int = 128
    """Longest completion in tokens."""
    temperature: float = 1.0
    """Sampling temperature (> 0); log-probs for the loss use the same temperature."""
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


class Scorer(Protocol):
    """What scores completions (`rl.rewards.Rewards`): (total (N,), per-function parts (N, K)) and K names."""

    names: list[str]

    def score(self, completions: Sequence[str], records: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor]:
        ...


def encode_prompt(tokenizer: Tokenizer, record: dict[str, Any], chat: bool = True) -> list[int]:
    """Token ids of a prompt record (`data.prompts.read_prompts`): its `messages` through the chat template
    with the generation prompt (`chat`), or its `prompt` string as it is."""
    if not chat:
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{record.get('where', 'a prompt record')}: a message-list prompt needs chat: true")
        return tokenizer.encode(record["prompt"])
    from ..tokenizer.chat import encode_chat

    return encode_chat(tokenizer, record["messages"], add_generation_prompt=True).ids


def encode_prompts(tokenizer: Tokenizer, records: Sequence[dict[str, Any]], chat: bool,
                   max_length: int) -> list[list[int]]:
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


def _engine_config(model: nn.Module, n: int, longest: int) -> EngineConfig:
    """Engine limits for one round of n sequences of at most `longest` tokens: KV blocks for all of them."""
    from ..inference.engine import EngineConfig
    from ..inference.paged import PagedKVCache

    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    bs = 16
    tokens = n * (-(-longest // bs) + 1) * bs
    gb = tokens * PagedKVCache.bytes_per_token(model.cfg, dtype) / 2**30
    return EngineConfig(block_size=bs, kv_cache_gb=max(gb, 1e-3), max_running=max(1, min(n, 256)))


def sample_rollouts(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                    records: Sequence[dict[str, Any]], group_size: int, sampling: SamplingConfig,
                    seeds: Sequence[int] | None = None, greedy: bool = False, logprobs: bool = False) -> Rollouts:
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


def reward_evaluator(tok: Tokenizer, prompts: list[list[int]], records: list[dict[str, Any]], rewards: Scorer,
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


def score_rollouts(rollouts: Rollouts, rewards: Scorer) -> Rollouts:
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

