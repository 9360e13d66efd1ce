"""Deploying through ONNX: SmolLM2-135M-Instruct exported by lmforge (`models.onnx.export_onnx`), run by ONNX Runtime
through the torch-free `inference.onnx_runner.OnnxGenerator`, against lmforge's own engine on the same CPU.

1. `export` (one process): export the float32 graph (seconds); ORT vs lmforge max |Δ logits| for a 64-token prefill
   and 16 greedy decode steps fed with the graph's own presents (the KV cache), the reference being lmforge's full
   forward pass over the whole sequence (no cache); then ORT's own quantizers through `quantize_onnx`: int8
   (`quantize_dynamic`, per-channel weights, activations quantized per call) and int4 (`MatMulNBits`, symmetric
   blocks of 32, accuracy_level 4 = int8 compute): seconds and size on disk.
2. `decode`: every backend in its own process with 2 threads, started once and timed in turns (the repeats
   interleave across backends, the order rotating each round, a pause between turns): lmforge's engine in float32
   and bfloat16 (`Engine.stream`, what `lmforge generate` runs) and `OnnxGenerator` on the fp32 / int8 / int4
   graphs; the same 32-token prompt, 128 new greedy tokens with end-of-sequence ignored, one warm-up run, best of
   --repeats. Decode rate = (new tokens - 1) / time from the first new token to the last (prefill reported apart).
   Quality: each backend's perplexity on the first 1024 tokens of the first held-out standard-library module
   (`data.stdlib.stdlib_heldout_texts`), one forward pass.

Graphs live under the scratch folder (common.SCRATCH)/onnx (never the repository). Parts merge into benchmarks/results/compress_onnx.json.

    python benchmarks/compress_onnx.py export          # ~2-4 min
    python benchmarks/compress_onnx.py decode          # ~3-5 min (needs export's graphs)
    python benchmarks/compress_onnx.py --quick         # a tiny random model, seconds; result under the scratch folder (common.SCRATCH)
    python benchmarks/compress_onnx.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import RESULTS, Record, SCRATCH, add_out_argument, load_average, run_child

MODEL = "smollm2-135m-instruct"
THREADS = 2
PROMPT_TOKENS, NEW_TOKENS, PPL_TOKENS = 32, 128, 1024
PARITY_PREFILL, PARITY_STEPS = 64, 16
QUICK = {"prompt_tokens": 16, "new_tokens": 16, "ppl_tokens": 128, "prefill": 16, "steps": 4}
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
        "from Mainz, combined movable metal type, oil-based ink and a wooden screw press. Within fifty years "
        "printing shops had spread to more than two hundred cities across Europe, and the price of books fell. "
        "Pamphlets, newspapers and scientific journals followed, and literacy rose with the supply of cheap print.")
BACKENDS = {  # name -> (runtime, dtype or graph folder)
    "lmforge-fp32": ("lmforge", "float32"),
    "lmforge-bf16": ("lmforge", "bfloat16"),
    "ort-fp32": ("ort", "fp32"),
    "ort-int8": ("ort", "int8"),
    "ort-int4": ("ort", "int4"),
}
PARTS = ["export", "decode"]
MARK = "@@json "  # a worker's result lines start with this (libraries may print to stdout too)


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(QUICK)
    return {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "ppl_tokens": PPL_TOKENS,
            "prefill": PARITY_PREFILL, "steps": PARITY_STEPS}


def graphs(quick: bool) -> Path:
    return SCRATCH / ("onnx-quick" if quick else "onnx")


# ---- shared with compress_gguf.py: one side per process, timed in interleaved turns ---------------------------------

class Worker:
    """One side in its own process, set up once (its first JSON line: setup figures), then timed on demand ("run"),
    so the repeats of several sides interleave without reloading any of them."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.log = open(SCRATCH / f"worker-{name}.log", "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        self.setup = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        self.log.flush()
        tail = (SCRATCH / f"worker-{self.name}.log").read_text()[-2000:]
        raise RuntimeError(f"worker {self.name} ended: {tail}")

    def ask(self, command: str = "run") -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def serve(setup: Callable[[], tuple[dict[str, Any], Callable[[], dict[str, Any]]]]) -> None:
    """The worker's side of `Worker`: print setup's figures, then one timed run per "run" line until "quit"."""
    info, run = setup()
    print(MARK + json.dumps(info, default=str), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(MARK + json.dumps(run(), default=str), flush=True)


def interleaved(workers: dict[str, Worker], repeats: int, key: str, pause: float = 1.0) -> dict[str, dict]:
    """Time every worker `repeats` times in turns (the order rotating each round, `pause` seconds before each turn
    so no other side's threads still spin); per side: best and median of `key`, every run with the 1-minute load
    average at its start, and the best run's other figures."""
    names = list(workers)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(pause)
            load = os.getloadavg()[0]
            out = workers[name].ask()
            out["load_1min"] = round(load, 2)
            runs[name].append(out)
            print(f"  round {r}: {name} {out[key]:.1f} (load {load:.2f})", file=sys.stderr, flush=True)
    result = {}
    for name, rs in runs.items():
        vals = sorted(x[key] for x in rs)
        best = max(rs, key=lambda x: x[key])
        result[name] = {**{k: v for k, v in best.items() if k != "load_1min"}, f"best_{key}": best[key],
                        f"median_{key}": vals[len(vals) // 2], "runs": [round(x[key], 2) for x in rs],
                        "run_load_1min": [x["load_1min"] for x in rs], **workers[name].setup}
    return result


def merge_part(bench: str, part: str, quick: bool, out: str | None, args: Any, peers: list[str],
               run: Callable[[], dict[str, Any]], summarize: Callable[[dict], dict],
               sizes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one part and merge its figures into the results JSON (other parts' figures kept)."""
    path = Path(out) if out else (SCRATCH / f"{bench}_quick.json" if quick else RESULTS / f"{bench}.json")
    args.out = str(path)
    old = json.loads(path.read_text()) if path.exists() else {}
    result: dict[str, Any] = old.get("result", {})
    rec = Record(bench, args, peers=peers, sizes={"quick": quick, **(sizes or {})})
    started, load0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), load_average()
    row = run()
    row.update(started=started, load_avg_before=load0, load_avg_after=load_average())
    result.setdefault("parts", {})[part] = row
    result["summary"] = summarize(result["parts"])
    rec.write(result)
    return result


# ---- the text both sides read -------------------------------------------------------------------------------------

def prompt_ids(tok, n: int) -> list[int]:
    ids = tok.encode(TEXT)
    if len(ids) < n:
        raise ValueError(f"the prompt text has {len(ids)} tokens; expected at least {n}")
    return ids[:n]


def ppl_ids(tok, n: int) -> tuple[list[int], str]:
    """The first n tokens of the first held-out standard-library module, and its name."""
    from lmforge.data.stdlib import stdlib_heldout_texts

    name, text = stdlib_heldout_texts(1)[0]
    return tok.encode(text)[:n], name


def perplexity(logits, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:] under logits (T, V) of ids, in float64 (numpy)."""
    import numpy as np

    z = np.asarray(logits[:-1], np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def model_source(quick: bool):
    """(float32 model, tokenizer): SmolLM2-135M-Instruct, or (quick) compress_quant's tiny random Llama."""
    from compress_quant import source

    return source(quick)


# ---- part 1: export, parity, ORT quantizers ------------------------------------------------------------------------

def export_part(quick: bool) -> dict[str, Any]:
    import numpy as np
    import torch

    from lmforge.inference.onnx_runner import OnnxGenerator
    from lmforge.models.onnx import export_onnx, quantize_onnx

    torch.set_num_threads(THREADS)
    s = sizes(quick)
    out = graphs(quick)
    model, tok = model_source(quick)
    res: dict[str, Any] = {}
    t = time.perf_counter()
    export_onnx(model, tok, out / "fp32")
    res["export_s"] = round(time.perf_counter() - t, 1)
    gen = OnnxGenerator(out / "fp32", threads=THREADS)
    seq = torch.tensor([prompt_ids(tok, s["prefill"])])  # (1, T)
    step, pos, past = seq.numpy(), np.arange(seq.shape[1])[None], gen.empty_past()
    diffs, scale = [], 0.0
    for _ in range(s["steps"] + 1):
        logits, past = gen.forward(step, pos, past)  # (1, t, V), presents
        with torch.no_grad():
            ref = model(seq).logits[:, -logits.shape[1]:].numpy()  # full forward, no cache
        diffs.append(float(np.abs(logits - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        nxt = int(logits[0, -1].argmax())
        seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
        step, pos = np.array([[nxt]]), np.array([[seq.shape[1] - 1]])
    res.update(max_abs_dlogits_prefill=diffs[0], max_abs_dlogits_decode=max(diffs[1:]), logit_scale_max_abs=scale,
               parity_prefill_tokens=s["prefill"], parity_decode_steps=s["steps"])
    for kind in ("int8", "int4"):
        t = time.perf_counter()
        quantize_onnx(out / "fp32", out / kind, kind=kind, block_size=32)
        res[f"quantize_{kind}_s"] = round(time.perf_counter() - t, 1)
    for kind in ("fp32", "int8", "int4"):
        res[f"size_{kind}_bytes"] = sum(f.stat().st_size for f in (out / kind).glob("model.onnx*"))
    res["graphs"] = str(out)
    return res


# ---- part 2: decode speed and perplexity, one process per backend ----------------------------------------------------

def backend_setup(name: str, quick: bool):
    """(setup figures, run) for one backend in this process: run() = one timed greedy decode."""
    runtime, what = BACKENDS[name]
    s = sizes(quick)
    if runtime == "lmforge":
        import torch

        from lmforge.inference.engine import Engine, SamplingParams

        torch.set_num_threads(THREADS)
        model, tok = model_source(quick)
        model = model.to(getattr(torch, what)).eval()
        engine = Engine(model, tok)
        ids = prompt_ids(tok, s["prompt_tokens"])
        text_ids, text_name = ppl_ids(tok, min(s["ppl_tokens"], model.cfg.max_position_embeddings))
        with torch.no_grad():
            ppl = perplexity(model(torch.tensor([text_ids])).logits[0].float().numpy(), text_ids)
        params = SamplingParams(max_new_tokens=s["new_tokens"], ignore_eos=True)

        def tokens():
            for outs in engine.stream([ids], params):
                for o in outs:
                    yield from o.token_ids
    else:
        import numpy as np

        from lmforge.inference.onnx_runner import OnnxGenerator

        gen = OnnxGenerator(graphs(quick) / what, threads=THREADS)
        ids = prompt_ids(gen.tokenizer, s["prompt_tokens"])
        text_ids, text_name = ppl_ids(gen.tokenizer, min(s["ppl_tokens"], gen.max_context))
        logits, _ = gen.forward(np.array([text_ids]), np.arange(len(text_ids))[None], gen.empty_past())
        ppl = perplexity(logits[0], text_ids)

        def tokens():
            yield from gen.stream(ids, s["new_tokens"], ignore_eos=True)

    def run() -> dict[str, Any]:
        start = time.perf_counter()
        toks, times = [], []
        for t in tokens():
            toks.append(int(t))
            times.append(time.perf_counter())
        n = len(toks)
        if n != s["new_tokens"]:
            raise RuntimeError(f"{name}: {n} new tokens, expected {s['new_tokens']}")
        return {"decode_tok_s": (n - 1) / (times[-1] - times[0]), "prefill_s": times[0] - start, "tokens": toks}

    run()  # warm-up: kernels, allocations
    info = {"perplexity": ppl, "ppl_tokens": len(text_ids), "ppl_text": text_name,
            "torch_imported": "torch" in sys.modules}
    return info, run


def decode_part(quick: bool, repeats: int, backends: list[str]) -> dict[str, Any]:
    if not (graphs(quick) / "int4").is_dir():
        raise SystemExit(f"no graphs under {graphs(quick)}: run the export part first")
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    workers: dict[str, Worker] = {}
    try:
        for name in backends:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, *(["--quick"] if quick else [])]
            workers[name] = Worker(name, cmd, env)
        res = interleaved(workers, repeats, "decode_tok_s")
    finally:
        for w in workers.values():
            w.close()
    base = res.get("lmforge-fp32", {}).get("tokens")
    for r in res.values():
        toks = r.pop("tokens")
        if base is not None:
            r["greedy_equal_to_lmforge_fp32"] = next((i for i, (a, b) in enumerate(zip(toks, base)) if a != b),
                                                     len(toks))
    return {"backends": res, "repeats": repeats, "threads": THREADS, **sizes(quick)}


# ---- summary and table -------------------------------------------------------------------------------------------

def summary(parts: dict[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"targets": {}}
    ex, dec = parts.get("export", {}), parts.get("decode", {}).get("backends", {})
    if "max_abs_dlogits_prefill" in ex:
        worst = max(ex["max_abs_dlogits_prefill"], ex["max_abs_dlogits_decode"])
        out["max_abs_dlogits"] = worst
        out["targets"]["ORT fp32 max |dlogits| <= 1e-4"] = worst <= 1e-4
        out["size_over_fp32"] = {k: ex[f"size_{k}_bytes"] / ex["size_fp32_bytes"] for k in ("int8", "int4")}
    ours = [dec[k]["best_decode_tok_s"] for k in ("lmforge-fp32", "lmforge-bf16") if k in dec]
    if ours:
        best = max(ours)
        out["speed_over_best_lmforge"] = {k: r["best_decode_tok_s"] / best for k, r in dec.items()}
        if "ort-int4" in dec:
            fast = dec["ort-int4"]["best_decode_tok_s"] >= 1.5 * best
            out["targets"]["ORT int4 >= 1.5x lmforge's best CPU decode"] = fast
    if "lmforge-fp32" in dec:
        p = dec["lmforge-fp32"]["perplexity"]
        out["perplexity_over_lmforge_fp32"] = {k: r["perplexity"] / p for k, r in dec.items()}
    return out


def table(result: dict[str, Any]) -> str:
    """A plain text table of the results so far (the docs' renderer: benchmarks/tables.py)."""
    parts, s = result.get("parts", {}), result.get("summary", {})
    lines = []
    ex = parts.get("export")
    if ex:
        lines.append(f"export {ex['export_s']} s; |dlogits| prefill {ex['max_abs_dlogits_prefill']:.2e}, decode "
                     f"{ex['max_abs_dlogits_decode']:.2e} (logits up to {ex['logit_scale_max_abs']:.1f}); "
                     f"int8 {ex['quantize_int8_s']} s, int4 {ex['quantize_int4_s']} s; MB fp32/int8/int4 "
                     + "/".join(f"{ex[f'size_{k}_bytes'] / 1e6:.0f}" for k in ("fp32", "int8", "int4")))
    dec = parts.get("decode", {}).get("backends", {})
    if dec:
        lines.append("backend | best tok/s | median | x best lmforge | prefill s | ppl | greedy = lmforge fp32 | loads")
        for k, r in dec.items():
            lines.append(f"{k} | {r['best_decode_tok_s']:.1f} | {r['median_decode_tok_s']:.1f} | "
                         f"{s.get('speed_over_best_lmforge', {}).get(k, float('nan')):.2f} | {r['prefill_s']:.3f} | "
                         f"{r['perplexity']:.3f} | {r.get('greedy_equal_to_lmforge_fp32')} | {r['run_load_1min']}")
    lines += [f"{k}: {v}" for k, v in s.get("targets", {}).items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", help=f"any of {PARTS}")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per backend (interleaved), best reported")
    ap.add_argument("--backends", default=",".join(BACKENDS), help=f"decode backends, any of {list(BACKENDS)}")
    ap.add_argument("--quick", action="store_true", help="a tiny random model (seconds); results under the scratch folder (common.SCRATCH)")
    ap.add_argument("--table", action="store_true", help="print the table of the results so far")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    add_out_argument(ap)
    args = ap.parse_args()
    if args.worker:
        serve(lambda: backend_setup(args.worker, args.quick))
        return
    if args.child:  # the export part in its own process
        print(json.dumps(export_part(args.quick)))
        return
    backends = args.backends.split(",")
    bad = [p for p in args.parts if p not in PARTS] + [b for b in backends if b not in BACKENDS]
    if bad:
        ap.error(f"unknown {bad}; expected parts from {PARTS} and backends from {list(BACKENDS)}")
    parts = args.parts or (PARTS if args.quick else [])
    if args.quick:
        args.repeats = min(args.repeats, 2)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    peers = ["onnxruntime", "onnx", "onnxscript", "numpy"]
    for part in parts:
        if part == "export":
            def run() -> dict[str, Any]:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "export",
                       *(["--quick"] if args.quick else [])]
                return run_child(cmd, {**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        else:
            def run() -> dict[str, Any]:
                return decode_part(args.quick, args.repeats, backends)
        result = merge_part("compress_onnx", part, args.quick, args.out, args, peers, run, summary,
                            {**sizes(args.quick), "repeats": args.repeats})
    if args.table or not parts:
        path = Path(args.out) if args.out else RESULTS / "compress_onnx.json"
        print(table(result or json.loads(path.read_text())["result"]))


if __name__ == "__main__":
    main()
