"""`lmforge plan`'s training memory per process against what the processes hold: one process, DDP, ZeRO-1, ZeRO-2
and FSDP2 (ZeRO-3) on 2 processes, and tensor parallelism TP=2 (gloo on CPU; on a GPU machine the same script).

Each layout runs under torchrun in its own processes. Each process builds the model, wraps it as the trainer does
(`engine.distributed.wrap`, `engine.zero.ZeroSharding`, `engine.optim.build_optimizer`) and runs the trainer's step
(bf16 autocast forward, backward, ZeRO's gradient hand-off or `distributed.clip_grad_norm`, AdamW, ZeRO's broadcast)
for 3 steps under `plan.live.LiveTensors`, which counts every tensor storage alive. Measured, per process (the
largest over the processes):
- state: bytes alive right after the optimizer step of step 3 (weights, optimizer states, the gradients kept for the
  step, DDP's buckets) against the estimate's weights + step gradients + optimizer + DDP buckets;
- peak: the high-water mark over steps 2-3 (the optimizer state exists) against the estimate's peak.
The RSS high-water mark above the process's resident set before the model was built is recorded beside them (it adds
the allocator's and gloo's own memory, which the plan does not model).

    python benchmarks/plan_memory.py                 # all layouts -> results/plan_memory.json
    python benchmarks/plan_memory.py ddp zero2       # some, merged into the results file
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Record, add_out_argument, peak_mib, status_mib  # noqa: E402

LAYOUTS = {"single": ("single", 1, 1), "ddp": ("ddp", 2, 1), "zero1": ("zero1", 2, 1), "zero2": ("zero2", 2, 1),
           "fsdp": ("fsdp", 2, 1), "tp2": ("ddp", 2, 2), "tp2sp": ("ddp", 2, 2)}
"""Name -> (parallel, processes, tp); tp2sp adds sequence parallelism."""
MODEL = {"preset": "llama-30m", "vocab_size": 16384}
BATCH, SEQ, STEPS = 4, 256, 3


def worker(out: str, parallel: str, tp: int, sequence: bool) -> None:
    import torch

    from lmforge.engine import distributed as D
    from lmforge.engine.optim import OptimConfig, build_optimizer
    from lmforge.engine.zero import ZeroSharding
    from lmforge.models.presets import preset
    from lmforge.models.transformer import Transformer
    from lmforge.plan.live import LiveTensors
    from lmforge.precision import autocast

    torch.set_num_threads(1)
    rss0 = status_mib("VmRSS") or 0.0
    world = D.init("cpu", tp=tp)
    cfg = preset(MODEL["preset"], vocab_size=MODEL["vocab_size"])
    torch.manual_seed(0)
    live = LiveTensors()
    with live:
        model = Transformer(cfg).train()
        pc = D.ParallelConfig(dp=parallel if parallel != "single" else "ddp", tp=tp, sequence=sequence)
        wrapped = D.wrap(model, pc, world)
        zero = ZeroSharding(model, world, pc.zero_stage) if pc.zero_stage in (1, 2) and world.distributed else None
        opt = build_optimizer(model, OptimConfig(), zero.owned if zero else None)
        g = torch.Generator().manual_seed(world.data_rank)
        x = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
        state = 0
        for step in range(STEPS):
            if step == 1:
                live.reset_peak()
            with autocast("bf16", world.device):
                loss = wrapped(x, labels=x).extra["loss_sum"] / x.numel()
            loss.backward()
            if zero is not None:
                zero.finish_gradients()
                zero.clip_grad_norm(1.0)
            else:
                D.clip_grad_norm(model.parameters(), 1.0)
            opt.step()
            if zero is not None:
                zero.broadcast_parameters()
            state = live.live
            opt.zero_grad(set_to_none=True)
    result = {"rank": world.rank, "state": state, "peak": live.peak, "rss_peak_mib": peak_mib() - rss0}
    Path(out, f"rank{world.rank}.json").write_text(json.dumps(result))
    D.shutdown()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(name: str, tmp: Path) -> dict:
    from lmforge.models.presets import preset
    from lmforge.plan.memory import TrainSetup, training_memory

    parallel, procs, tp = LAYOUTS[name]
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={_port()}",
           "--master_addr=127.0.0.1", __file__, "--worker", str(out), parallel, str(tp), str(name == "tp2sp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]
    cfg = preset(MODEL["preset"], vocab_size=MODEL["vocab_size"])
    est = training_memory(cfg, TrainSetup(micro_batch=BATCH, seq_len=SEQ, parallel=parallel, devices=procs, tp=tp,
                                          sequence_parallel=name == "tp2sp", precision="bf16", device="cpu"))
    est_state = est.weights + est.step_gradients + est.optimizer + est.ddp_buckets
    state, peak = max(r["state"] for r in ranks), max(r["peak"] for r in ranks)
    return {"parallel": parallel, "processes": procs, "tp": tp, "measured_state": state, "estimated_state": est_state,
            "state_error": est_state / state - 1, "measured_peak": peak, "estimated_peak": est.peak,
            "peak_error": est.peak / peak - 1, "rss_peak_mib": max(r["rss_peak_mib"] for r in ranks),
            "estimate": est.to_dict(), "ranks": ranks}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "True")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layouts", nargs="*", help=f"some of {', '.join(LAYOUTS)} (default: all)")
    add_out_argument(ap)
    args = ap.parse_args()
    args.layouts = args.layouts or list(LAYOUTS)
    if set(args.layouts) - set(LAYOUTS):
        ap.error(f"unknown layouts {sorted(set(args.layouts) - set(LAYOUTS))}; expected some of {list(LAYOUTS)}")
    import tempfile

    rec = Record("plan_memory", args, sizes={"model": MODEL, "micro_batch": BATCH, "seq_len": SEQ, "steps": STEPS})
    path = Path(args.out) if args.out else RESULTS / "plan_memory.json"
    rows = json.loads(path.read_text())["result"]["layouts"] if path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts:
            rows[name] = measure(name, Path(tmp))
            r = rows[name]
            if "error" not in r:
                print(f"{name}: state {r['measured_state'] / 2**20:.1f} MiB (estimate {r['state_error']:+.1%}), "
                      f"peak {r['measured_peak'] / 2**20:.1f} MiB (estimate {r['peak_error']:+.1%})", file=sys.stderr)
    rec.write({"layouts": rows})


if __name__ == "__main__":
    main()
