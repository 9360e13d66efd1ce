"""`lmforge grpo` end to end on a tiny random decoder with the real stdlib BPE tokenizer: it runs and writes what
finetune writes, only trainable parameters change and the reference never does, the rollout batch source resumes
at the exact micro-batch (mid-round and at a round boundary), and bad configs stop early. The slow test shows GRPO
raising the held-out reward of SmolLM2-135M-Instruct + LoRA on stdlib doctest prompts."""

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

REWARD = "def length(completion, record):\n    return float(len(completion))\n"
"""A reward that differs within almost every group (character length), so advantages are never all zero."""


@pytest.fixture(scope="module")
def tiny(bpe_data, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(random llama-tiny folder with the stdlib BPE + ChatML template, prompts JSONL, reward module file)."""
    from lmforge.models import Transformer
    from lmforge.models.loading import save
    from lmforge.models.presets import preset
    from lmforge.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("grpo")
    tok = Tokenizer.from_dir(bpe_data.tokenizer)
    torch.manual_seed(0)
    cfg = preset("llama-tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                 bos_token_id=tok.bos_id)
    save(Transformer(cfg), tok, root / "model")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}.", "answer": " ".join(map(str, range(i)))}) + "\n"
                               for i in range(1, 25)))
    reward = root / "my_rewards.py"
    reward.write_text(REWARD)
    return root / "model", prompts, reward


def _config(tmp_path: Path, tiny, name: str, **over) -> Path:
    model, prompts, reward = tiny
    cfg = {"run_dir": str(tmp_path / name), "method": "lora", "model": {"init_from": str(model)},
           "data": {"train": [str(prompts)], "validation_fraction": 0.2, "eval_limit": 4},
           "rewards": [{"name": f"{reward}:length", "weight": 0.1},
                       {"name": "regex_format", "options": {"pattern": "[0-9]", "mode": "search"}}],
           "group_size": 4, "prompts_per_round": 2, "num_iterations": 2, "beta": 0.04,
           "sampling": {"temperature": 1.0, "max_new_tokens": 10},
           "lora": {"rank": 4, "alpha": 8},
           "train": {"steps": 6, "micro_batch": 4, "log_every": 1, "eval_every": 0, "save_every": 1, "keep_last": 10,
                     "tensorboard": False, "progress_bar": False, "precision": "fp32", "device": "cpu",
                     "optimizer": {"lr": 2e-2}, "schedule": {"warmup_steps": 0}}}
    return dump_config(cfg, tmp_path / f"{name}.yaml", **over)


def _rows(run: Path) -> dict[int, dict]:
    keep = ("loss", "reward", "kl", "ratio", "clip_frac", "rollout/reward_mean", "rollout/round")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in keep if k in r} for r in rows if "loss" in r}


def test_grpo_runs_saves_and_resumes_exactly(tiny, tmp_path):
    cfg = _config(tmp_path, tiny, "run")
    run = tmp_path / "run"
    assert cli.main(["grpo", "--config", str(cfg)]) == 0
    straight = _rows(run)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    # rounds of 2 x 4 rollouts in micro-batches of 4, two passes: a new round at steps 1 and 5
    assert [straight[s]["rollout/round"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 1]
    assert straight[1]["ratio"] == pytest.approx(1.0, abs=1e-5)  # the first update is on-policy
    assert all("kl" in r and "clip_frac" in r for r in straight.values())
    result = json.loads((run / "eval.json").read_text())
    assert "val_reward" in result and "val_reward" in result["before"] and "reward_mean" in result["last_round"]
    lineage = json.loads((run / "lmforge.json").read_text())
    assert lineage["stage"] == "grpo" and 0 < lineage["trainable_parameters"] < lineage["total_parameters"]
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all("lora_" in k for k in load_file(str(run / "checkpoints" / "step-000003" / "model.safetensors")))
    merged, tok = lmforge.load(run / "final")  # the merged model loads and runs
    assert torch.isfinite(merged(torch.tensor([tok.encode("Count to 3.")])).logits).all()

    for resume_from in (3, 4):  # mid-round (the saved round is replayed) and at a round boundary (regenerated)
        for ckpt in (run / "checkpoints").iterdir():
            if int(ckpt.name.split("-")[1]) > resume_from:
                shutil.rmtree(ckpt)
        shutil.rmtree(run / "adapter")
        assert cli.main(["grpo", "--config", str(cfg)]) == 0
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [0, 1, 2, 3, 4, 5, 6]  # resumed (each step logged once), not restarted
        assert _rows(run) == straight
        again = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(again[k], adapter[k]) for k in adapter)


@pytest.mark.parametrize("over", [{"method": "full"}, {"beta": 0.0, "num_iterations": 1, "loss_type": "dr_grpo",
                                                     "scale_rewards": "none", "train.grad_accum": 2}])
def test_grpo_variants_run_and_save(tiny, tmp_path, over):
    """Full fine-tuning (a frozen copy as the reference) and beta 0 / Dr. GRPO with one update per round."""
    cfg = _config(tmp_path, tiny, "v", **{"train.steps": 2, "train.save_every": 0, **over})
    assert cli.main(["grpo", "--config", str(cfg)]) == 0
    rows = _rows(tmp_path / "v")
    assert ("kl" in rows[1]) == (over.get("beta", 0.04) > 0)
    if over.get("num_iterations") == 1:  # one optimizer step per round, used once: no old log-probs, ratio 1
        assert rows[1]["ratio"] == 1.0 and rows[1]["rollout/round"] == 0 and rows[2]["rollout/round"] == 1
    model, _ = lmforge.load(tmp_path / "v" / "final")
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("method", ["lora", "full"])
def test_only_trainable_parameters_change_and_the_reference_never_does(tiny, tmp_path, method):
    from lmforge.data.prompts import read_prompts
    from lmforge.engine.optim import OptimConfig
    from lmforge.engine.trainer import TrainConfig, Trainer
    from lmforge.models.loading import load_tokenizer
    from lmforge.objectives.preference import adapters_disabled
    from lmforge.objectives.rl import GRPOObjective
    from lmforge.rl.batches import GRPOBatches
    from lmforge.rl.rewards import RewardSpec, Rewards
    from lmforge.rl.rollouts import SamplingConfig, encode_prompts, sequence_logprobs
    from lmforge.transforms.lora import LoraConfig
    from lmforge.transforms.methods import build_model

    model_dir, prompts, reward = tiny
    tok = load_tokenizer(model_dir)
    model = build_model(str(model_dir), method, precision="fp32", lora=LoraConfig(rank=4, alpha=8))
    ref = None
    if method == "full":
        import copy

        ref = copy.deepcopy(model).requires_grad_(False)
        ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    recs = read_prompts(str(prompts))
    rewards = Rewards([RewardSpec(f"{reward}:length")])
    data = GRPOBatches(model, tok, encode_prompts(tok, recs, True, 64), recs, rewards, group_size=4,
                       prompts_per_round=2, micro_batch=4, sampling=SamplingConfig(max_new_tokens=8), beta=0.1,
                       ref_model=ref)
    probe = data.next_batch()
    ref_logps = sequence_logprobs(ref, probe) if ref is not None else probe["ref_logps"]
    data.buffer.served = 0  # serve the probed round from its start
    cfg = TrainConfig(steps=3, micro_batch=4, log_every=1, tensorboard=False, progress_bar=False, precision="fp32",
                      device="cpu", save_every=0, optimizer=OptimConfig(lr=1e-2))
    Trainer(model, GRPOObjective(beta=0.1, ref_model=ref), data, cfg, tmp_path / "run").fit()
    after = dict(model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    trainable = {k for k, p in after.items() if p.requires_grad}
    assert changed <= trainable
    if method == "lora":
        assert {k for k in trainable if ".lora_B." in k} <= changed  # every adapter moved (B starts at zero)
        with adapters_disabled(model):  # the reference is the untouched base: its log-probs are unchanged
            torch.testing.assert_close(sequence_logprobs(model, probe), ref_logps, rtol=0, atol=0)
    else:
        assert {k for k in trainable if ".blocks." in f".{k}"} <= changed
        assert all(torch.equal(ref_before[k], v) for k, v in ref.state_dict().items())
        torch.testing.assert_close(sequence_logprobs(ref, probe), ref_logps, rtol=0, atol=0)
    assert model.training  # rollouts put the model back in train mode


@pytest.mark.parametrize("method", ["lora", "full"])
def test_rollouts_sample_from_the_current_weights(tiny, method):
    """The engine's log-probs of the sampled tokens equal a plain forward of the model as it is now, before and
    after an in-place update (what an optimizer step does): no stale packed weights or prefix cache, LoRA honoured."""
    from lmforge.data.prompts import read_prompts
    from lmforge.models.loading import load_tokenizer
    from lmforge.rl.rollouts import SamplingConfig, collate_rollouts, encode_prompts, sample_rollouts, \
        sequence_logprobs
    from lmforge.transforms.lora import LoraConfig
    from lmforge.transforms.methods import build_model

    model_dir, prompts, _ = tiny
    tok = load_tokenizer(model_dir)
    model = build_model(str(model_dir), method, precision="fp32", lora=LoraConfig(rank=4, alpha=8))
    recs = read_prompts(str(prompts))[:4]
    ids = encode_prompts(tok, recs, True, 64)
    sampling = SamplingConfig(max_new_tokens=6)

    def engine_vs_forward():
        ro = sample_rollouts(model, tok, ids, recs, 2, sampling, seeds=range(8), logprobs=True)
        batch = collate_rollouts(ro.prompt_ids, ro.completion_ids, tok.pad_id)
        direct = sequence_logprobs(model, batch)[batch["labels"] != -100]
        engine = torch.tensor([lp for row in ro.sample_logprobs for lp in row])
        torch.testing.assert_close(engine, direct, atol=2e-4, rtol=1e-4)
        return ro.completion_ids

    first = engine_vs_forward()
    with torch.no_grad():  # an optimizer-like in-place update of the trainable weights
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.5 if method == "lora" else 0.05))
    assert engine_vs_forward() != first


def test_batch_source_state_dict_round_trips_through_json(tiny):
    from lmforge.data.prompts import read_prompts
    from lmforge.models.loading import load_tokenizer
    from lmforge.rl.batches import GRPOBatches
    from lmforge.rl.rewards import RewardSpec, Rewards
    from lmforge.rl.rollouts import SamplingConfig, encode_prompts
    from lmforge.transforms.lora import LoRALinear, LoraConfig
    from lmforge.transforms.methods import build_model

    model_dir, prompts, reward = tiny
    tok = load_tokenizer(model_dir)
    model = build_model(str(model_dir), "lora", precision="fp32", lora=LoraConfig(rank=4, alpha=8))
    recs = read_prompts(str(prompts))
    ids = encode_prompts(tok, recs, True, 64)

    def source():
        return GRPOBatches(model, tok, ids, recs, Rewards([RewardSpec(f"{reward}:length")]), group_size=4,
                           prompts_per_round=2, num_iterations=2, micro_batch=2, seed=3,
                           sampling=SamplingConfig(max_new_tokens=8))

    a = source()
    for _ in range(3):
        a.next_batch()
    assert all(m.active == "default" for m in model.modules() if isinstance(m, LoRALinear))  # routing undone
    state = json.loads(json.dumps(a.state_dict()))
    b = source()
    b.load_state_dict(state)
    for _ in range(8):  # the rest of the round (replayed from the state), then a new round (regenerated)
        x, y = a.next_batch(), b.next_batch()
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x if not k.endswith("_s") and "tokens_per_s" not in k)
    assert "old_logps" in x and "ref_logps" not in x  # several updates per round, beta 0
    with pytest.raises(ValueError, match="cannot resume"):
        GRPOBatches(model, tok, ids[:-1], recs[:-1], Rewards([RewardSpec("exact_match")]),
                    micro_batch=8, seed=3).load_state_dict(state)


def test_objective_computes_the_reference_itself_when_the_batch_has_none(tiny):
    from lmforge.data.prompts import read_prompts
    from lmforge.models.loading import load_tokenizer
    from lmforge.objectives.rl import GRPOObjective
    from lmforge.rl.batches import GRPOBatches
    from lmforge.rl.rewards import RewardSpec, Rewards
    from lmforge.rl.rollouts import SamplingConfig, encode_prompts
    from lmforge.transforms.lora import LoraConfig
    from lmforge.transforms.methods import build_model

    model_dir, prompts, reward = tiny
    tok = load_tokenizer(model_dir)
    model = build_model(str(model_dir), "lora", precision="fp32", lora=LoraConfig(rank=4, alpha=8))
    recs = read_prompts(str(prompts))
    data = GRPOBatches(model, tok, encode_prompts(tok, recs, True, 64), recs, Rewards([RewardSpec(f"{reward}:length")]),
                       group_size=4, prompts_per_round=1, micro_batch=4, beta=0.1,
                       sampling=SamplingConfig(max_new_tokens=8))
    batch = data.next_batch()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))  # the policy moves away from the reference: kl > 0
    objective = GRPOObjective(beta=0.1)
    loss, m = objective(model, batch)
    batch.pop("ref_logps")
    loss2, m2 = objective(model, batch)
    assert m["kl"] > 0
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(m2["kl"], m["kl"])


@pytest.mark.parametrize("over, where, needle", [
    ({"group_size": 3}, "", "must fill whole optimizer steps of train.micro_batch x train.grad_accum"),
    ({"rewards": [{"name": "exact_mach"}]}, "rewards[0]", "did you mean 'exact_match'"),
    ({"rewards": [{"name": "exact_match", "options": {"feild": "answer"}}]}, "rewards[0]", "unknown option 'feild'"),
    ({"rewards": [{"name": "exact_match", "options": {"field": "target"}}]}, "prompts.jsonl:1",
     "the rewards read field(s) ['target']"),
    ({"sampling.temperature": 0.0}, "sampling", "temperature must be > 0"),
    ({"sampling.max_new_tokens": 300}, "", "leaves no room for a prompt in the model's context of 256 tokens"),
])
def test_bad_configs_stop_early(tiny, tmp_path, capsys, over, where, needle):
    cfg = _config(tmp_path, tiny, "bad", **over)
    assert cli.main(["grpo", "--config", str(cfg)]) != 0
    err = capsys.readouterr().err
    assert needle in err and where in err
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.slow
def test_grpo_raises_held_out_reward_of_smollm2(tmp_path):
    """SmolLM2-135M-Instruct + LoRA on stdlib doctest prompts (what does the last line print?): the base model's
    greedy exact-match reward is neither 0 nor 1, and a short GRPO run raises it on held-out doctests."""
    from lmforge.data.align_data import doctest_prompts

    splits = doctest_prompts(chat=False)
    for name, records in splits.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = Path(__file__).parents[2] / "recipes" / "align" / "grpo-smollm2.yaml"
    code = cli.main(["grpo", "--config", str(recipe), f"run_dir={tmp_path / 'run'}",
                     f"data.train=[{tmp_path / 'train.jsonl'}]", f"data.validation=[{tmp_path / 'test.jsonl'}]",
                     "train.progress_bar=false"])
    assert code == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    before, after = result["before"]["val_reward"], result["val_reward"]
    print(f"held-out reward {before:.4f} -> {after:.4f}")
    assert 0 < before < 1
    assert after > before
