"""Training throughput: lmforge's engine vs `transformers`' LlamaForCausalLM with a plain AdamW loop.

Same Llama architecture (6 layers, width 384, 6 heads / 2 KV heads, MLP 1024, vocab 8192), sequence 256,
batch 8, same precision, same random token batches. Ours runs `Trainer.fit()` (the real engine, with its
logging and NaN guard) on an in-memory batch source; the peer runs forward, loss, backward, clip, AdamW step.
Each side runs in its own subprocess; memory is the training memory (peak RSS above the resident set after the
model is built, see common.training_baseline), so neither side is charged for its imports; the matmul peak is
measured in the same run for MFU. Prints a table and a JSON line.

    python benchmarks/train_throughput.py [--steps 20] [--repeats 3] [--precision bf16 fp32] [--size 124m]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from common import (CyclingSource, Record, add_out_argument, peak_mib, random_batches, run_child, sync_device,
                    training_baseline)

SIZES = {  # (layers, width, heads, kv heads, mlp, vocab)
    "small": (6, 384, 6, 2, 1024, 8192),
    "124m": (12, 768, 12, 4, 2048, 32768),
}


def matmul_peak(dtype: str, n: int = 2048, reps: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` (the device's practical peak for MFU)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype])
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    for _ in range(2):
        a @ b
    sync_device(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync_device(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def run_ours(args) -> dict:
    import tempfile

    import torch

    from lmforge.engine.trainer import Trainer, TrainConfig
    from lmforge.models import ModelConfig, Transformer
    from lmforge.objectives.causal_lm import CausalLM

    layers, width, heads, kv, mlp, vocab = SIZES[args.size]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=heads,
                                    num_kv_heads=kv, intermediate_size=mlp, max_position_embeddings=args.seq,
                                    tie_embeddings=False))
    data = random_batches(vocab, args.batch, args.seq, args.steps + args.warmup)

    times = []
    src = CyclingSource(data)
    cfg = TrainConfig(steps=args.warmup, micro_batch=args.batch, precision=args.precision, log_every=10**9,
                      save_every=0, tensorboard=False, progress_bar=False, resume=False, device=dev,
                      compile=args.compile)
    cfg.optimizer.lr, cfg.optimizer.weight_decay = 3e-4, 0.1
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(model, CausalLM(), src, cfg, d)
        trainer.save = lambda: None  # checkpoint writing is not what this benchmark measures
        base = training_baseline(dev, model)
        trainer.fit()  # warm-up steps
        sync_device(dev)
        t = time.perf_counter()
        trainer.cfg.steps = args.warmup + args.steps
        trainer.fit()
        sync_device(dev)
        times.append(time.perf_counter() - t)
    return _result(args, times[0], model, dev, base)


def run_peer(args) -> dict:
    import torch
    import transformers

    layers, width, heads, kv, mlp, vocab = SIZES[args.size]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=mlp,
                                   max_position_embeddings=args.seq, tie_word_embeddings=False,
                                   attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).to(dev).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95))
    data = random_batches(vocab, args.batch, args.seq, args.steps + args.warmup)
    ctx = (torch.autocast(dev, dtype=torch.bfloat16) if args.precision == "bf16"
           else torch.autocast(dev, enabled=False))

    def step(x):
        x = x.to(dev)
        with ctx:  # the loss as transformers computes it: logits upcast to fp32, then cross-entropy
            logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    base = training_baseline(dev, model)
    for x in data[: args.warmup]:
        step(x)
    sync_device(dev)
    t = time.perf_counter()
    for x in data[args.warmup:]:
        step(x)
    sync_device(dev)
    return _result(args, time.perf_counter() - t, model, dev, base)


def _result(args, seconds: float, model, dev: str, base: float) -> dict:
    tokens = args.steps * args.batch * args.seq
    n = sum(p.numel() for p in model.parameters())
    emb = SIZES[args.size][1] * SIZES[args.size][5]
    layers, width = SIZES[args.size][0], SIZES[args.size][1]
    flops_per_token = 6 * (n - emb) + 12 * layers * width * args.seq  # input embedding is a lookup
    peak = peak_mib(dev)
    return {"tokens_per_s": tokens / seconds, "flops_per_token": flops_per_token, "peak_mem_mib": peak - base,
            "absolute_peak_mib": peak, "baseline_mib": base,
            "mem_kind": "cuda max allocated above the baseline" if dev == "cuda" else
            "peak RSS above the RSS after building the model (training memory)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side; the best counts")
    ap.add_argument("--compile", action="store_true", help="ours with train.compile=true (torch.compile per block)")
    ap.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)
    add_out_argument(ap)
    args = ap.parse_args()
    if args.side:  # child process: one precision
        args.precision = args.precision[0]
        print(json.dumps((run_ours if args.side == "ours" else run_peer)(args)))
        return
    rec = Record("train_throughput", args, peers=["transformers"],
                 sizes={"size": args.size, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                        "seq": args.seq, "repeats": args.repeats})
    import torch

    rows = []
    for prec in args.precision:
        # MFU against the fastest way this machine multiplies: where the CPU has no native bf16 a bf16 GEMM runs at
        # a quarter of fp32's speed, and lmforge's bf16 context multiplies the bf16 operands with the fp32 GEMM
        peak = max(matmul_peak(prec), matmul_peak("fp32")) if prec == "bf16" and not torch.cuda.is_available() \
            else matmul_peak(prec)
        res: dict[str, dict] = {}
        for _ in range(args.repeats):  # interleaved; the best run of each side counts (less noise from neighbours)
            for side in ("ours", "peer"):
                cmd = [sys.executable, __file__, "--side", side, "--precision", prec, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
                       "--size", args.size] + (["--compile"] if args.compile else [])
                r = run_child(cmd)
                if "error" in r:
                    raise SystemExit(f"{side} {prec}: {r['error']}")
                if side not in res or r["tokens_per_s"] > res[side]["tokens_per_s"]:
                    res[side] = r
        o, p = res["ours"], res["peer"]
        rows.append({"precision": prec, "ours_tokens_per_s": o["tokens_per_s"], "peer_tokens_per_s": p["tokens_per_s"],
                     "speedup": o["tokens_per_s"] / p["tokens_per_s"],
                     "ours_mfu": o["tokens_per_s"] * o["flops_per_token"] / peak,
                     "peer_mfu": p["tokens_per_s"] * p["flops_per_token"] / peak, "matmul_peak_tflops": peak / 1e12,
                     "ours_mem_mib": o["peak_mem_mib"], "peer_mem_mib": p["peak_mem_mib"],
                     "mem_ratio": o["peak_mem_mib"] / p["peak_mem_mib"], "mem_kind": o["mem_kind"]})
    print(f"{'precision':9} {'ours tok/s':>10} {'hf tok/s':>10} {'ratio':>6} {'ours MFU':>8} {'hf MFU':>7} "
          f"{'ours MiB':>9} {'hf MiB':>8} {'mem':>5}")
    for r in rows:
        print(f"{r['precision']:9} {r['ours_tokens_per_s']:10.0f} {r['peer_tokens_per_s']:10.0f} {r['speedup']:6.2f} "
              f"{r['ours_mfu']:8.1%} {r['peer_mfu']:7.1%} {r['ours_mem_mib']:9.0f} {r['peer_mem_mib']:8.0f} "
              f"{r['mem_ratio']:5.2f}")
    rec.write({"compile": args.compile, "size": args.size, "batch": args.batch, "seq": args.seq, "rows": rows})


if __name__ == "__main__":
    main()
