"""`lmforge ppo` end to end on a tiny random decoder with the real stdlib BPE tokenizer, scored by a (tiny) reward
model written as `lmforge reward` writes one plus a reward function: it runs, logs the PPO quantities, saves the
policy and the value head, resumes at the exact micro-batch; only the LoRA adapters and the value head train and
the reference never changes; the first update of a round is on-policy; β follows the KL target."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_fixtures import bpe_data, dump_config  # noqa: F401

import lmforge
from lmforge import cli
from lmforge.config import load_config
from lmforge.stages import ppo

REWARD = "def length(completion, record):\n    return float(len(completion))\n"


@pytest.fixture(scope="module")
def tiny(bpe_data, tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """(policy folder, reward-model folder, prompts JSONL, reward module file)."""
    from lmforge.models import Transformer
    from lmforge.models.loading import save
    from lmforge.models.presets import preset
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("ppo")
    tok = Tokenizer.from_dir(bpe_data.tokenizer)
    ids = dict(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id)
    torch.manual_seed(0)
    save(Transformer(preset("llama-tiny", **ids)), tok, root / "policy")
    save(Transformer(preset("llama-tiny", head="classifier", num_labels=1, **ids)), tok, root / "rm")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(1, 25)))
    reward = root / "my_rewards.py"
    reward.write_text(REWARD)
    return root / "policy", root / "rm", prompts, reward


def _config(tmp_path: Path, tiny, name: str, **over) -> Path:
    policy, rm, prompts, reward = tiny
    cfg = {"run_dir": str(tmp_path / name), "method": "lora", "model": {"init_from": str(policy)},
           "data": {"train": [str(prompts)], "validation_fraction": 0.2, "eval_limit": 4},
           "rewards": [{"name": "reward_model", "options": {"path": str(rm)}},
                       {"name": f"{reward}:length", "weight": 0.01}],
           "prompts_per_round": 8, "ppo_epochs": 2, "beta": 0.05, "kl_target": 0.01, "kl_horizon": 100,
           "sampling": {"temperature": 1.0, "max_new_tokens": 8}, "lora": {"rank": 4, "alpha": 8},
           "train": {"steps": 6, "micro_batch": 4, "log_every": 1, "eval_every": 0, "save_every": 1, "keep_last": 10,
                     "tensorboard": False, "progress_bar": False, "precision": "fp32", "device": "cpu",
                     "optimizer": {"lr": 1e-2}, "schedule": {"warmup_steps": 0}}}
    return dump_config(cfg, tmp_path / f"{name}.yaml", **over)


def _rows(run: Path) -> dict[int, dict]:
    keep = ("loss", "policy_loss", "value_loss", "clip_frac", "approx_kl", "entropy", "score", "rollout/kl",
            "rollout/beta", "rollout/round")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in keep if k in r} for r in rows if "loss" in r}


def test_ppo_runs_saves_and_resumes_exactly(tiny, tmp_path):
    cfg = _config(tmp_path, tiny, "run")
    run = tmp_path / "run"
    assert cli.main(["ppo", "--config", str(cfg)]) == 0
    straight = _rows(run)
    # rounds of 8 rollouts in micro-batches of 4, two epochs: 4 steps per round, a new round at steps 1 and 5
    assert [straight[s]["rollout/round"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 1]
    for s in (1, 5):  # the first micro-batch of a round is on-policy: no clipping, ratio 1
        assert straight[s]["clip_frac"] == 0 and abs(straight[s]["approx_kl"]) < 1e-6
    assert all(k in straight[2] for k in ("value_loss", "entropy", "score", "rollout/kl"))
    # the KL of the first round is far above the 0.01 target (random LoRA init is the base: KL 0 -> beta falls)
    assert straight[5]["rollout/beta"] != straight[1]["rollout/beta"]
    result = json.loads((run / "eval.json").read_text())
    assert "val_reward" in result and "val_reward" in result["before"] and "kl" in result["last_round"]
    head = load_file(str(run / "value_head" / "value_head.safetensors"))
    assert head["weight"].shape[0] == 1 and head["weight"].abs().sum() > 0  # zero-initialised, then trained
    merged, tok = lmforge.load(run / "final")
    assert not hasattr(merged, "value_head")
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))

    for resume_from in (3, 4):  # mid-round (the saved round is replayed) and at a round boundary
        for ckpt in (run / "checkpoints").iterdir():
            if int(ckpt.name.split("-")[1]) > resume_from:
                shutil.rmtree(ckpt)
        shutil.rmtree(run / "adapter")
        assert cli.main(["ppo", "--config", str(cfg)]) == 0
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [0, 1, 2, 3, 4, 5, 6]
        assert _rows(run) == straight
        again = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(again[k], adapter[k]) for k in adapter)


def test_only_lora_and_value_head_train_and_the_reference_never_changes(tiny, tmp_path):
    from lmforge.data.prompts import read_prompts
    from lmforge.engine.optim import OptimConfig
    from lmforge.engine.trainer import TrainConfig, Trainer
    from lmforge.models.loading import load_tokenizer
    from lmforge.objectives.preference import adapters_disabled
    from lmforge.objectives.rl import PPOObjective, value_head
    from lmforge.rl.batches import PPOBatches
    from lmforge.rl.rewards import RewardSpec, Rewards
    from lmforge.rl.rollouts import SamplingConfig, encode_prompts, sequence_logprobs
    from lmforge.transforms.lora import LoraConfig
    from lmforge.transforms.methods import build_model

    policy, rm, prompts, reward = tiny
    tok = load_tokenizer(policy)
    model = build_model(str(policy), "lora", precision="fp32", lora=LoraConfig(rank=4, alpha=8))
    value_head(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    recs = read_prompts(str(prompts))
    rewards = Rewards([RewardSpec("reward_model", options={"path": str(rm)})])
    data = PPOBatches(model, tok, encode_prompts(tok, recs, True, 64), recs, rewards, prompts_per_round=8,
                      ppo_epochs=2, micro_batch=4, sampling=SamplingConfig(max_new_tokens=8), beta=0.1)
    probe = data.next_batch()
    with adapters_disabled(model):
        ref_logps = sequence_logprobs(model, probe)
    data.buffer.served = 0
    cfg = TrainConfig(steps=4, micro_batch=4, log_every=1, tensorboard=False, progress_bar=False, precision="fp32",
                      device="cpu", save_every=0, optimizer=OptimConfig(lr=1e-2))
    Trainer(model, PPOObjective(), data, cfg, tmp_path / "run").fit()
    after = dict(model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    trainable = {k for k, p in after.items() if p.requires_grad}
    assert changed <= trainable and {"value_head.weight", "value_head.bias"} <= changed
    assert {k for k in trainable if ".lora_B." in k} <= changed
    with adapters_disabled(model):
        torch.testing.assert_close(sequence_logprobs(model, probe), ref_logps, rtol=0, atol=0)


@pytest.mark.parametrize("whiten", [False, True])
def test_rewards_are_score_minus_kl_and_advantages_follow_gae(tiny, whiten):
    """The batch source's maths on a real round: with γ = λ = 1 the return at the first completion token is the
    whole per-token reward sum, score − β·Σ(log π − log π_ref); returns − values are the advantages; whitened
    advantages have mean 0 and std 1 over the round."""
    from lmforge.data.prompts import read_prompts
    from lmforge.models.loading import load_tokenizer
    from lmforge.objectives.preference import adapters_disabled
    from lmforge.objectives.rl import value_head
    from lmforge.rl.batches import PPOBatches
    from lmforge.rl.rewards import RewardSpec, Rewards
    from lmforge.rl.rollouts import SamplingConfig, encode_prompts, sequence_logprobs
    from lmforge.transforms.lora import LoraConfig
    from lmforge.transforms.methods import build_model

    policy, rm, prompts, reward = tiny
    tok = load_tokenizer(policy)
    model = build_model(str(policy), "lora", precision="fp32", lora=LoraConfig(rank=4, alpha=8))
    with torch.no_grad():  # move the adapters and the value head off zero: policy != reference, values != 0
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        value_head(model).weight.normal_(0, 0.1)
    recs = read_prompts(str(prompts))
    beta = 0.5
    data = PPOBatches(model, tok, encode_prompts(tok, recs, True, 64), recs, Rewards([RewardSpec(f"{reward}:length")]),
                      prompts_per_round=8, ppo_epochs=1, micro_batch=4, sampling=SamplingConfig(max_new_tokens=8),
                      beta=beta, gamma=1.0, lam=1.0, whiten=whiten)
    batches = [data.next_batch() for _ in range(2)]
    if whiten:
        adv = torch.cat([b["advantages"][b["labels"] != -100] for b in batches])
        assert abs(adv.mean().item()) < 1e-5 and abs(adv.std().item() - 1) < 1e-4
        return
    for b in batches:
        mask = b["labels"] != -100
        with adapters_disabled(model):
            ref = sequence_logprobs(model, b)
        first = mask.float().argmax(-1)  # (B,) first completion position
        rows = torch.arange(len(first))
        expected = b["scores"] - beta * torch.where(mask, b["old_logps"] - ref, 0).sum(-1)
        torch.testing.assert_close(b["returns"][rows, first], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.where(mask, b["returns"] - b["old_values"], 0), b["advantages"],
                                   atol=1e-5, rtol=1e-5)
    assert batches[0]["rollout/kl"].item() != 0


@pytest.mark.parametrize("kl, direction", [(1.0, 1), (0.0001, -1)])
def test_adaptive_kl_controller_moves_beta_towards_the_target(tiny, kl, direction, monkeypatch):
    """Ziegler et al. 2019 §2.2: β grows when the KL is above the target and shrinks below it, by at most 20% of
    N/horizon per round."""
    from lmforge.rl import batches as rollouts

    data = rollouts.PPOBatches.__new__(rollouts.PPOBatches)
    data.beta, data.kl_target, data.kl_horizon = 0.1, 0.05, 100
    data._adapt_beta(kl, 10)
    assert (data.beta - 0.1) * direction > 0 and abs(data.beta - 0.1) <= 0.1 * 0.2 * 10 / 100 + 1e-12


@pytest.mark.slow
def test_ppo_raises_the_reward_model_score_of_smollm2_within_the_kl_target(tmp_path):
    """The recipes on the real SmolLM2-135M-Instruct: a reward model trained on stdlib docstring pairs, then PPO
    against it; the held-out score of greedy answers rises and the rollouts' KL to the base stays under the
    target (minutes)."""
    recipes = Path(__file__).parents[2] / "recipes" / "align"
    assert cli.main(["reward", "--config", str(recipes / "reward-smollm2.yaml"), f"run_dir={tmp_path / 'rm'}",
                     "train.progress_bar=false"]) == 0
    rewards = json.dumps([{"name": "reward_model", "options": {"path": str(tmp_path / "rm" / "final"),
                                                                "batch_size": 16}}])
    assert cli.main(["ppo", "--config", str(recipes / "ppo-smollm2.yaml"), f"run_dir={tmp_path / 'ppo'}",
                     f"rewards={rewards}", "train.progress_bar=false"]) == 0
    result = json.loads((tmp_path / "ppo" / "eval.json").read_text())
    target = load_config(ppo.Config, recipes / "ppo-smollm2.yaml").kl_target
    before, after, kl = result["before"]["val_reward"], result["val_reward"], result["last_round"]["kl"]
    print(f"held-out reward-model score {before:.4f} -> {after:.4f}; last round KL {kl:.3f} (target {target})")
    assert after > before
    assert kl < target
