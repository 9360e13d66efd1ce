"""Does quantization keep the model? Round-to-nearest and GPTQ (Frantar et al. 2022) on SmolLM2-135M-Instruct:
held-out bits per byte against bf16, the fraction of RTN's gap GPTQ closes, size on disk against fp32, quantization
seconds and reload exactness.

Each configuration runs in its own process: load SmolLM2 (float32), quantize the block linears (GPTQ in float32 on
the calibration windows `lmforge quantize` draws: `data.calibration.calibration_windows(["{stdlib}"], tok, 128,
512, seed 0)`, the held-out modules excluded; the windows are cached under the scratch folder (common.SCRATCH) so GPTQ, Wanda and SparseGPT
see the same ones), `save_quantized` with the float parameters in bf16, `lmforge.load` the folder back
(codes, scales and mins compared with torch.equal) and score the reloaded model with `eval.compression.measure`'s
`stdlib-ppl` (the held-out standard-library modules, disjoint windows of 2048 tokens, what compress.json
reports). The references are the same model saved and scored in float32 and in bf16.

Note: the local SmolLM2 is a llama.cpp Q4_1 GGUF (block linears on a 4-bit grid with groups of 32, min and scale),
so "fp32" is that grid dequantized; RTN int4 g32 asymmetric reproduces it exactly (`rtn-int4-g32-asym`).

    python benchmarks/compress_quant.py fp32 bf16 rtn-int8-channel rtn-int4-g32     # merged into the results
    python benchmarks/compress_quant.py gptq-int4-g32-act
    python benchmarks/compress_quant.py --quick                                        # tiny random model, seconds
    python benchmarks/compress_quant.py --table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, Record, SCRATCH, add_out_argument, git_state, load_average, run_child

MODEL = "smollm2-135m-instruct"
CALIB_SAMPLES, CALIB_LEN, CALIB_SEED = 128, 512, 0
QUICK_CALIB = (8, 64)
CONFIGS: dict[str, dict[str, Any]] = {  # name -> float dtype, or the quantizer's settings
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "rtn-int8-channel": {"method": "rtn", "bits": 8, "group_size": None},
    "rtn-int4-g32": {"method": "rtn", "bits": 4, "group_size": 32},
    "gptq-int4-g32-act": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True},
    "rtn-int4-g192": {"method": "rtn", "bits": 4, "group_size": 192},
    "gptq-int4-g192-act": {"method": "gptq", "bits": 4, "group_size": 192, "act_order": True},
    "gptq-int4-g32": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": False},
    "rtn-int4-g32-asym": {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False},
    "rtn-int8-channel-emb8": {"method": "rtn", "bits": 8, "group_size": None, "embedding": True},
}
PAIRS = [("rtn-int4-g32", "gptq-int4-g32-act"), ("rtn-int4-g32", "gptq-int4-g32"),
         ("rtn-int4-g192", "gptq-int4-g192-act")]
"""(RTN, GPTQ) at the same group size: the fraction of RTN's gap to bf16 that GPTQ closes."""
QUICK_CONFIGS = ["fp32", "bf16", "rtn-int8-channel", "rtn-int4-g32", "gptq-int4-g32-act"]


# ---- shared with compress_prune.py --------------------------------------------------------------------------------

def source(quick: bool):
    """(model float32, tokenizer): SmolLM2-135M-Instruct, or (quick) a 2-block random Llama of width 64 with
    SmolLM2's tokenizer."""
    import lmforge

    if not quick:
        model, tok = lmforge.load(MODEL, dtype="float32")
        return model.float().eval(), tok
    import dataclasses

    import torch
    from lmforge.models.gguf import load_gguf_tokenizer
    from lmforge.models.loading import resolve
    from lmforge.models.presets import preset
    from lmforge.models.transformer import Transformer

    tok = load_gguf_tokenizer(resolve(MODEL))
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset("llama-tiny"), vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                              eos_token_id=tok.eos_id)
    return Transformer(cfg).eval(), tok


def calibration(tok, quick: bool):
    """(windows (n, T) token ids, their description): `calibration_windows` over the standard library without the
    held-out modules, cached so every method of both benchmarks calibrates on the same windows."""
    n, length = QUICK_CALIB if quick else (CALIB_SAMPLES, CALIB_LEN)
    return calibration_sized(tok, n, length)


def calibration_sized(tok, n: int, length: int):
    """(windows, description) of n windows of `length` tokens (cached by size and seed)."""
    import torch
    from lmforge.data.calibration import calibration_windows

    cache = SCRATCH / f"calibration-{n}x{length}-seed{CALIB_SEED}.pt"
    t = time.perf_counter()
    if cache.exists():
        windows = torch.load(cache)
    else:
        windows = calibration_windows(["{stdlib}"], tok, n, length, CALIB_SEED)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(windows, cache)
    info = {"source": "calibration_windows(['{stdlib}']) without the stdlib-ppl held-out modules and tests",
            "samples": n, "seq_len": length, "seed": CALIB_SEED,
            "sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
            "seconds": round(time.perf_counter() - t, 1)}
    return windows, info


def heldout(model, tok, quick: bool, path: Path | None = None) -> dict[str, Any]:
    """`eval.compression.measure` with only `stdlib-ppl` (the held-out modules, disjoint windows of
    min(context, 2048) tokens) and no decode timing; quick: one document."""
    from lmforge.eval.compression import CompressEval, measure

    out = measure(model, tok, CompressEval(tasks=["stdlib-ppl"], limit=1 if quick else 200, decode_tokens=0), path)
    ppl = out["stdlib-ppl"]
    return {"bpb": ppl["bits_per_byte"], "perplexity": ppl["perplexity"], "documents": ppl["documents"],
            "tokens": ppl["tokens"], "window": min(model.cfg.max_position_embeddings, 2048), "eval_s": ppl["seconds"],
            **({"size_bytes": out["size_bytes"]} if path else {})}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def scratch(name: str, quick: bool) -> Path:
    p = SCRATCH / "folders" / (("quick-" if quick else "") + name.replace(":", "_"))
    shutil.rmtree(p, ignore_errors=True)
    return p


def main_for(bench: str, configs: dict[str, Any], quick_configs: list[str], child, summarize, table,
             doc: str) -> None:
    """The command line both benchmarks share: positional configuration names (each run in its own process and
    merged into benchmarks/results/<bench>.json), --quick (tiny random model, written under the scratch folder (common.SCRATCH)), --table."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("configs", nargs="*", help=f"any of {list(configs)}")
    ap.add_argument("--quick", action="store_true", help="a tiny random model (seconds); results under the scratch folder (common.SCRATCH)")
    ap.add_argument("--table", action="store_true", help="print the table of the results so far")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    add_out_argument(ap)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(2)
        print(json.dumps(child(args.child, args.quick), default=str))
        return
    unknown = [c for c in args.configs if c not in configs]
    if unknown:
        ap.error(f"unknown configurations {unknown}; expected any of {list(configs)}")
    names = args.configs or (quick_configs if args.quick else [])
    if args.quick and not args.out:
        args.out = str(SCRATCH / f"{bench}_quick.json")
    path = Path(args.out) if args.out else RESULTS / f"{bench}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    result: dict[str, Any] = old.get("result", {"configs": {}})
    if names:
        rec = Record(bench, args, sizes={"quick": args.quick})
        for name in names:
            started, load0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), load_average()
            cmd = [sys.executable, str(Path(sys.argv[0]).resolve()), "--child", name,
                   *(["--quick"] if args.quick else [])]
            row = run_child(cmd)
            row.update(config=name, started=started, load_avg_before=load0, load_avg_after=load_average(),
                       git=git_state())
            print(json.dumps(row), file=sys.stderr, flush=True)
            result["configs"][name] = row
            result["configs"] = {k: result["configs"][k] for k in configs if k in result["configs"]}
            result["summary"] = summarize({k: r for k, r in result["configs"].items() if "error" not in r})
            rec.write(result)  # after every configuration: an interrupted run keeps what it measured
    if args.table or not names:
        print(table({bench: {"result": result, **{k: v for k, v in old.items() if k != "result"}}}))


# ---- this benchmark -----------------------------------------------------------------------------------------------

def quant_child(name: str, quick: bool) -> dict[str, Any]:
    """One configuration in this process: quantize, save, reload, compare, score."""
    import lmforge
    import torch
    from lmforge.models.loading import save
    from lmforge.transforms.gptq import gptq_quantize
    from lmforge.transforms.quant import QuantLinear, quantize_rtn, save_quantized

    spec = CONFIGS[name]
    model, tok = source(quick)
    row: dict[str, Any] = {}
    path = scratch(f"quant-{name}", quick)
    if "dtype" in spec:
        dtype = getattr(torch, spec["dtype"])
        save(model.to(dtype), tok, path, dtype=dtype)
    else:
        method, bits, group = spec["method"], spec["bits"], spec["group_size"]
        sym, act = spec.get("symmetric", True), spec.get("act_order", False)
        row.update(method=method, bits=bits, group_size=group, symmetric=sym, act_order=act)
        if method == "gptq":
            windows, row["calibration"] = calibration(tok, quick)
        t = time.perf_counter()
        if method == "rtn":
            quantize_rtn(model, bits, group, sym)
            if spec.get("embedding"):  # the token embedding (and the tied head) int8, one scale per token
                from lmforge.transforms.quant import quantize_embedding

                quantize_embedding(model)
                row["embedding_bits"] = 8
        else:
            gptq_quantize(model, windows, bits, group, sym, act, progress=False)
        row["quantize_s"] = round(time.perf_counter() - t, 1)
        save_quantized(model, tok, path, dtype=torch.bfloat16)
    loaded, _ = lmforge.load(path)
    if "dtype" not in spec:  # codes, scales and mins back exactly; the float parameters as bf16
        layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        back = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
        same = layers.keys() == back.keys() and all(
            torch.equal(m.weight, back[n].weight) and torch.equal(m.weight_scale, back[n].weight_scale)
            and (m.weight_min is None) == (back[n].weight_min is None)
            and (m.weight_min is None or torch.equal(m.weight_min, back[n].weight_min)) for n, m in layers.items())
        floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point() and "weight_" not in k}
        loaded_sd = loaded.state_dict()
        row["reload_exact"] = bool(same)
        # the float parameters as saved: bf16, except an int8 embedding (its dequantized values, float32)
        row["reload_floats_exact"] = all(torch.equal(v.to(loaded_sd[k].dtype), loaded_sd[k]) for k, v in floats.items())
        row["reload_float_dtypes"] = sorted({str(loaded_sd[k].dtype).removeprefix("torch.") for k in floats})
        row["quantized_layers"] = len(layers)
    row.update(heldout(loaded, tok, quick, path))
    row["folder_bytes"] = folder_bytes(path)
    shutil.rmtree(path)
    return row


def summary(configs: dict[str, dict]) -> dict[str, Any]:
    """Ratios to bf16 and fp32, the fraction of RTN's gap GPTQ closes, and the issue's targets."""
    bf16, fp32 = configs.get("bf16"), configs.get("fp32")
    out: dict[str, Any] = {"bpb_over_bf16": {}, "size_over_fp32": {}, "gap_closed": {}, "targets": {}}
    for name, r in configs.items():
        if bf16 and "bpb" in r:
            out["bpb_over_bf16"][name] = r["bpb"] / bf16["bpb"]
        if fp32 and "size_bytes" in r:
            out["size_over_fp32"][name] = r["size_bytes"] / fp32["size_bytes"]
    for rtn, gptq in PAIRS:
        if bf16 and rtn in configs and gptq in configs:
            gap = configs[rtn]["bpb"] - bf16["bpb"]
            out["gap_closed"][f"{gptq} vs {rtn}"] = (gap - (configs[gptq]["bpb"] - bf16["bpb"])) / gap
    ratio, size, closed = out["bpb_over_bf16"], out["size_over_fp32"], out["gap_closed"]
    t = out["targets"]
    if "gptq-int4-g32-act" in ratio:
        t["gptq int4 g32 act-order within +5% of bf16"] = ratio["gptq-int4-g32-act"] <= 1.05
    key = "gptq-int4-g32-act vs rtn-int4-g32"
    if key in closed:
        t["gptq int4 g32 closes >= 30% of RTN's gap"] = closed[key] >= 0.30
    if "rtn-int8-channel" in ratio:
        t["rtn int8 within +1% of bf16"] = ratio["rtn-int8-channel"] <= 1.01
    if "rtn-int8-channel" in size:
        t["int8 folder <= 0.27x fp32"] = size["rtn-int8-channel"] <= 0.27
    return out


if __name__ == "__main__":
    from tables import compress_quant as table  # the docs' own renderer

    main_for("compress_quant", CONFIGS, QUICK_CONFIGS, quant_child, summary, table, __doc__)
