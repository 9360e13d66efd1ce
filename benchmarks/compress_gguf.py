"""Deploying through GGUF: SmolLM2-135M-Instruct quantized by lmforge, written as Q8_0 / Q4_0 blocks copied from its
own codes (`models.gguf.save_gguf`), run by real llama.cpp (the prebuilt `xllamacpp` wheel) against lmforge on the
same weights.

1. `q8_0`: RTN int8 g32 symmetric codes -> Q8_0 file. On 50 held-out docstring prompts (first lines of docstrings
   of the held-out standard-library modules), 32 greedy tokens: llama.cpp on our Q8_0 file vs lmforge in float32 on
   the dequantized weights (the engine, no cache tricks); the control: the same dequantized weights written as F32
   GGUF, llama.cpp vs lmforge; and llama.cpp Q8_0 vs llama.cpp F32. llama.cpp's Q8_0 CPU kernels round every
   32-wide block of the activations to int8 too, which breaks near ties (its own F32 and Q8_0 disagree as often),
   so the three counts are reported together; plus lmforge's next-token argmax along llama.cpp's own Q8_0 text, and,
   where the Q8_0 continuation parts from lmforge's, how far apart lmforge's logits of the two tokens were there.
2. `gptq`: GPTQ int4 g32 symmetric, act-order with static groups (Frantar et al. 2022) on compress_quant's
   calibration windows (128 x 512 tokens of the standard library without the held-out modules), saved under
   the scratch folder (common.SCRATCH) for the next part (~4.5 min on 2 cores); without it `q4_0` falls back to RTN and says so.
3. `q4_0`: those codes -> Q4_0 file (f16 embedding, as llama.cpp's own files): read back by
   `load_gguf_quantized`, every layer's codes and scales torch.equal to the QuantLinear's; llama.cpp's next-token
   argmax after every prefix of held-out standard-library text (its KV cache reused) vs lmforge's (float32,
   dequantized, the embedding rounded to f16 as in the file).
4. `speed`: llama.cpp decode tokens/s (its own `predicted_per_second`) on our Q4_0 file vs the SmolLM2 package's
   own Q4_1 file: same xllamacpp, 2 threads, llama.cpp's defaults (f16 KV cache), the same 32-token prompt, 128
   new tokens with end-of-sequence ignored, each file in its own process, one warm-up, best of --repeats
   interleaved runs, the load average at every run.

Every llama.cpp side runs in its own process; files live under the scratch folder (common.SCRATCH)/gguf. Parts merge into
benchmarks/results/compress_gguf.json.

    python benchmarks/compress_gguf.py q8_0            # ~3 min
    python benchmarks/compress_gguf.py gptq            # ~5 min
    python benchmarks/compress_gguf.py q4_0 speed      # ~3 min
    python benchmarks/compress_gguf.py --quick         # a tiny random model, seconds; result under the scratch folder (common.SCRATCH)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import RESULTS, LlamaCppServer, run_child
from compress_onnx import SCRATCH, TEXT, THREADS, Worker, interleaved, merge_part, serve

MODEL = "smollm2-135m-instruct"
PARTS = ["q8_0", "gptq", "q4_0", "speed"]
FULL = {"prompts": 50, "greedy_tokens": 32, "texts": 8, "text_tokens": 256, "speed_prompt": 32, "speed_tokens": 128,
        "n_ctx": 512}
QUICK = {"prompts": 4, "greedy_tokens": 8, "texts": 2, "text_tokens": 32, "speed_prompt": 16, "speed_tokens": 16,
         "n_ctx": 256}


def sizes(quick: bool) -> dict[str, int]:
    return dict(QUICK if quick else FULL)


def files(quick: bool) -> Path:
    p = SCRATCH / ("gguf-quick" if quick else "gguf")
    p.mkdir(parents=True, exist_ok=True)
    return p


def gptq_folder(quick: bool) -> Path:
    return SCRATCH / "folders" / (("quick-" if quick else "") + "compress_gguf-gptq-int4-g32-act")


# ---- llama.cpp, one process per file -----------------------------------------------------------------------------

def llama_job(job: dict[str, Any]) -> dict[str, Any]:
    """In this process: greedy continuations of prompts, or the greedy next token after every prefix of texts."""
    server = LlamaCppServer(job["path"], job["n_ctx"], THREADS, exact=True)
    t = time.perf_counter()
    if job["mode"] == "greedy":
        out = [server.complete(p, job["n"])["tokens"] for p in job["prompts"]]
    else:  # teacher-forced: the KV cache of the common prefix reused
        out = [[server.complete(ids[:k], 1, cache_prompt=True)["tokens"][0] for k in range(1, len(ids))]
               for ids in job["texts"]]
    return {"tokens": out, "seconds": round(time.perf_counter() - t, 1)}


def run_llama(job: dict[str, Any], name: str) -> list[list[int]]:
    """`llama_job` in a fresh process."""
    path = SCRATCH / f"gguf-job-{name}.json"
    path.write_text(json.dumps(job))
    out = run_child([sys.executable, str(Path(__file__).resolve()), "--llama-job", str(path)])
    if "error" in out:
        raise RuntimeError(f"llama.cpp {name}: {out['error']}")
    return out["tokens"]


def speed_setup(path: str, prompt: list[int], n: int, n_ctx: int):
    """A worker timing llama.cpp's decode on one file (llama.cpp's defaults)."""
    server = LlamaCppServer(path, n_ctx, THREADS, exact=False)

    def run() -> dict[str, Any]:
        t = time.perf_counter()
        r = server.complete(prompt, n, ignore_eos=True)
        tm = r["timings"]
        if tm["predicted_n"] != n:
            raise RuntimeError(f"{path}: {tm['predicted_n']} tokens, expected {n}")
        return {"decode_tok_s": tm["predicted_per_second"], "prompt_tok_s": tm["prompt_per_second"],
                "wall_s": time.perf_counter() - t}

    server.complete(prompt, 8, ignore_eos=True)  # warm-up
    return {"file": path, "file_bytes": Path(path).stat().st_size, "tensor_types": tensor_types(path)}, run


def tensor_types(path: str | Path) -> dict[str, Any]:
    """How many tensors of each GGML type the file holds, and the token embedding's (also the tied output)."""
    from collections import Counter

    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    kinds = {t.name: t.tensor_type.name for t in tensors}
    return {"counts": dict(Counter(kinds.values())), "token_embd": kinds.get("token_embd.weight"),
            "output": kinds.get("output.weight", "tied")}


# ---- lmforge's side ------------------------------------------------------------------------------------------------

def model_source(quick: bool):
    from compress_quant import source

    return source(quick)


def dequantized(model):
    """The same model with every QuantLinear replaced by a float linear holding its dequantized weight (float32)."""
    from lmforge.models.transformer import Transformer
    from lmforge.transforms.quant import QuantLinear

    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(("weight_scale", "weight_min"))}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            sd[f"{name}.weight"] = m.dequantize()  # (out, in) float32
    out = Transformer(model.cfg).eval()
    out.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return out


def docstring_prompts(n: int) -> list[str]:
    """First lines (>= 20 characters) of docstrings of the held-out standard-library modules, in order."""
    import ast

    from lmforge.data.stdlib import stdlib_heldout_texts

    lines: list[str] = []
    for _, source in stdlib_heldout_texts(20):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                first = ast.get_docstring(node).strip().splitlines()[0].strip()
                if len(first) >= 20 and first not in lines:
                    lines.append(first)
    if len(lines) < n:
        raise ValueError(f"only {len(lines)} docstring prompts; expected {n}")
    return lines[:n]


def same(a: list[int], b: list[int]) -> bool:
    """Equal continuations up to where the shorter stopped (llama.cpp also stops at tokens named like an end of
    text, which the engine stops at only when the config lists them)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def argmax_along(ref, prompts: list[list[int]], texts: list[list[int]]) -> tuple[int, int]:
    """(positions where ref's argmax = the text's next token, positions) along each prompt + its continuation."""
    import torch

    hit = total = 0
    for p, t in zip(prompts, texts):
        if not t:
            continue
        with torch.no_grad():
            z = ref(torch.tensor([p + t])).logits[0, len(p) - 1:-1]  # (len(t), V)
        hit += int((z.argmax(-1) == torch.tensor(t)).sum())
        total += len(t)
    return hit, total


def divergence_gaps(ref, prompts: list[list[int]], theirs: list[list[int]], ours: list[list[int]]) -> list[float]:
    """For each continuation where llama.cpp's tokens part from lmforge's: lmforge's logit of its own token minus
    its logit of llama.cpp's token at the first differing position (0 = an exact tie), smallest first."""
    import torch

    gaps = []
    for p, a, b in zip(prompts, theirs, ours):
        k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)
        if k is not None:
            with torch.no_grad():
                z = ref(torch.tensor([p + b[:k]])).logits[0, -1].float()  # (V,)
            gaps.append(round(float(z[b[k]] - z[a[k]]), 4))
    return sorted(gaps)


def q8_0_part(quick: bool) -> dict[str, Any]:
    from lmforge.inference.engine import Engine, SamplingParams
    from lmforge.models.gguf import save_gguf
    from lmforge.transforms.quant import quantize_rtn

    s = sizes(quick)
    model, tok = model_source(quick)
    quantize_rtn(model, 8, 32, True)
    ref = dequantized(model)
    prompts = [tok.encode(p) for p in docstring_prompts(s["prompts"])]
    t = time.perf_counter()
    ours = [o.token_ids for o in Engine(ref).generate(prompts, SamplingParams(max_new_tokens=s["greedy_tokens"]))]
    ours_s = time.perf_counter() - t
    q8_path = save_gguf(model, tok, files(quick) / "smollm2-rtn-int8-g32-q8_0.gguf")
    f32_path = save_gguf(ref, tok, files(quick) / "smollm2-rtn-int8-g32-dequantized-f32.gguf")
    job = {"mode": "greedy", "prompts": prompts, "n": s["greedy_tokens"], "n_ctx": s["n_ctx"]}
    q8 = run_llama({**job, "path": str(q8_path)}, "q8_0")
    f32 = run_llama({**job, "path": str(f32_path)}, "f32")
    counts = {name: sum(same(a, b) for a, b in zip(x, y))
              for name, x, y in (("q8_0_vs_lmforge", q8, ours), ("f32_vs_lmforge", f32, ours),
                                 ("q8_0_vs_f32", q8, f32))}
    hit, total = argmax_along(ref, prompts, q8)
    hit_f32, total_f32 = argmax_along(ref, prompts, f32)
    gaps = divergence_gaps(ref, prompts, q8, ours)
    return {"prompts": len(prompts), "greedy_tokens": s["greedy_tokens"], "equal": counts,
            "lmforge_argmax_along_llama_q8_0": {"agree": hit, "positions": total, "pct": 100 * hit / total},
            "lmforge_argmax_along_llama_f32": {"agree": hit_f32, "positions": total_f32,
                                               "pct": 100 * hit_f32 / total_f32},
            "q8_0_divergence_logit_gaps": gaps,
            "q8_0_bytes": q8_path.stat().st_size, "f32_bytes": f32_path.stat().st_size,
            "lmforge_generate_s": round(ours_s, 1), "codes": "rtn int8 g32 symmetric"}


def gptq_part(quick: bool) -> dict[str, Any]:
    import torch
    from compress_quant import calibration

    from lmforge.transforms.gptq import gptq_quantize
    from lmforge.transforms.quant import save_quantized

    model, tok = model_source(quick)
    windows, info = calibration(tok, quick)
    t = time.perf_counter()
    gptq_quantize(model, windows, 4, 32, True, True, progress=False)
    secs = time.perf_counter() - t
    path = save_quantized(model, tok, gptq_folder(quick), dtype=torch.float32)
    return {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True, "act_order": True,
            "calibration": info, "quantize_s": round(secs, 1), "folder": str(path)}


def q4_0_part(quick: bool, rtn: bool, gptq_from: str | None = None) -> dict[str, Any]:
    import torch

    import lmforge
    from lmforge.data.stdlib import stdlib_heldout_texts
    from lmforge.models.gguf import load_gguf_quantized, save_gguf
    from lmforge.transforms.quant import QuantLinear, quantize_rtn

    s = sizes(quick)
    folder = Path(gptq_from) if gptq_from else gptq_folder(quick)
    if folder.is_dir() and not rtn:
        model, tok = lmforge.load(folder, dtype=torch.float32)
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        if (qc["method"], qc["bits"], qc["group_size"], qc["symmetric"]) != ("gptq", 4, 32, True):
            raise ValueError(f"{folder}: {qc['method']} int{qc['bits']} g{qc['group_size']} symmetric="
                             f"{qc['symmetric']}; expected a GPTQ int4 g32 symmetric folder")
        codes = "gptq int4 g32 symmetric" + ("" if gptq_from else " act-order (static groups)")
    else:
        model, tok = model_source(quick)
        quantize_rtn(model, 4, 32, True)
        codes = "rtn int4 g32 symmetric" + ("" if rtn else " (no GPTQ folder: run the gptq part first)")
    path = save_gguf(model, tok, files(quick) / "smollm2-int4-g32-q4_0.gguf", "f16")

    _, sd, _, qc = load_gguf_quantized(path)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    exact = [n for n, m in layers.items()
             if torch.equal(sd[f"{n}.weight"], m.weight) and torch.equal(sd[f"{n}.weight_scale"], m.weight_scale)
             and f"{n}.weight_min" not in sd]

    ref = dequantized(model)
    with torch.no_grad():  # the file's f16 embedding (and output, when untied)
        for p in {id(p): p for p in (ref.embed.tokens.weight, getattr(getattr(ref, "lm_head", None), "weight",
                                                                        None)) if p is not None}.values():
            p.copy_(p.half().float())
    texts = [tok.encode(text)[:s["text_tokens"]] for _, text in stdlib_heldout_texts(s["texts"])]
    theirs = run_llama({"mode": "teacher", "texts": texts, "n_ctx": s["n_ctx"], "path": str(path)}, "q4_0")
    per_text, hit, total = [], 0, 0
    for ids, t in zip(texts, theirs):
        with torch.no_grad():
            mine = ref(torch.tensor([ids])).logits[0, :-1].argmax(-1)  # (T - 1,)
        h = int((mine == torch.tensor(t)).sum())
        per_text.append(round(100 * h / len(t), 1))
        hit, total = hit + h, total + len(t)
    return {"codes": codes, "codes_from": str(folder) if "gptq" in codes else None, "file": str(path),
            "file_bytes": path.stat().st_size,
            "reload_exact_layers": len(exact), "quantized_layers": len(layers),
            "reload_exact": len(exact) == len(layers) and qc is not None and qc["bits"] == 4,
            "argmax_agree": hit, "positions": total, "argmax_agree_pct": 100 * hit / total,
            "per_text_pct": per_text, "texts": [n for n, _ in stdlib_heldout_texts(s["texts"])]}


def speed_part(quick: bool, repeats: int) -> dict[str, Any]:
    from lmforge.models.gguf import load_gguf_tokenizer
    from lmforge.models.loading import resolve

    s = sizes(quick)
    ours = files(quick) / "smollm2-int4-g32-q4_0.gguf"
    if not ours.exists():
        raise SystemExit(f"no {ours}: run the q4_0 part first")
    package = resolve(MODEL)
    prompt = load_gguf_tokenizer(package).encode(TEXT)[:s["speed_prompt"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    workers: dict[str, Worker] = {}
    try:
        for name, path in (("ours-q4_0", ours), ("package-q4_1", package)):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--speed-worker",
                   json.dumps({"path": str(path), "prompt": prompt, "n": s["speed_tokens"], "n_ctx": s["n_ctx"]})]
            workers[name] = Worker(f"gguf-{name}", cmd, env)
        res = interleaved(workers, repeats, "decode_tok_s")
    finally:
        for w in workers.values():
            w.close()
    return {"files": res, "repeats": repeats, "threads": THREADS, "prompt_tokens": len(prompt),
            "new_tokens": s["speed_tokens"], "kv_cache": "llama.cpp defaults (f16, flash attention auto)"}


# ---- summary and table -------------------------------------------------------------------------------------------

def summary(parts: dict[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"targets": {}}
    t = out["targets"]
    if "equal" in parts.get("q8_0", {}):
        q = parts["q8_0"]
        n = q["prompts"]
        t[f"Q8_0 greedy = lmforge on >= {n - 2}/{n}"] = q["equal"]["q8_0_vs_lmforge"] >= n - 2
        t[f"F32 control greedy = lmforge on >= {n - 2}/{n}"] = q["equal"]["f32_vs_lmforge"] >= n - 2
    if "argmax_agree_pct" in parts.get("q4_0", {}):
        t["Q4_0 next-token argmax agreement >= 95%"] = parts["q4_0"]["argmax_agree_pct"] >= 95
        t["Q4_0 reloads bit-exactly"] = parts["q4_0"]["reload_exact"]
    f = parts.get("speed", {}).get("files", {})
    if "ours-q4_0" in f and "package-q4_1" in f:
        out["q4_0_over_q4_1_decode"] = f["ours-q4_0"]["best_decode_tok_s"] / f["package-q4_1"]["best_decode_tok_s"]
    return out


def table(result: dict[str, Any]) -> str:
    """A plain text view of the results so far (the docs' renderer: benchmarks/tables.py)."""
    parts, lines = result.get("parts", {}), []
    if "equal" in parts.get("q8_0", {}):
        q = parts["q8_0"]
        lines.append(f"Q8_0: equal of {q['prompts']}: {q['equal']}; argmax along llama Q8_0 text "
                     f"{q['lmforge_argmax_along_llama_q8_0']['pct']:.1f}%, along F32 "
                     f"{q['lmforge_argmax_along_llama_f32']['pct']:.1f}%")
    if "gptq" in parts:
        lines.append(f"GPTQ: {parts['gptq'].get('quantize_s')} s")
    if "argmax_agree_pct" in parts.get("q4_0", {}):
        q = parts["q4_0"]
        lines.append(f"Q4_0 ({q['codes']}): reload exact {q['reload_exact']}; argmax {q['argmax_agree']}/"
                     f"{q['positions']} = {q['argmax_agree_pct']:.1f}% {q['per_text_pct']}")
    for k, r in parts.get("speed", {}).get("files", {}).items():
        lines.append(f"{k}: best {r['best_decode_tok_s']:.1f} tok/s, median {r['median_decode_tok_s']:.1f}, runs "
                     f"{r['runs']}, loads {r['run_load_1min']}, {r['file_bytes'] / 1e6:.1f} MB")
    lines += [f"{k}: {v}" for k, v in result.get("summary", {}).get("targets", {}).items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", help=f"any of {PARTS}")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per file (interleaved), best reported")
    ap.add_argument("--rtn", action="store_true", help="q4_0 from RTN codes even when the GPTQ folder exists")
    ap.add_argument("--gptq-folder", help="q4_0 from this saved GPTQ int4 g32 symmetric folder (e.g. written by "
                    "`lmforge quantize` or compress_quant) instead of the gptq part's")
    ap.add_argument("--quick", action="store_true", help="a tiny random model (seconds); results under the scratch folder (common.SCRATCH)")
    ap.add_argument("--table", action="store_true", help="print the table of the results so far")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--llama-job", help=argparse.SUPPRESS)
    ap.add_argument("--speed-worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=f"write the result record here instead of {RESULTS.name}/compress_gguf.json")
    args = ap.parse_args()
    if args.llama_job:
        print(json.dumps(llama_job(json.loads(Path(args.llama_job).read_text()))))
        return
    if args.speed_worker:
        w = json.loads(args.speed_worker)
        serve(lambda: speed_setup(w["path"], w["prompt"], w["n"], w["n_ctx"]))
        return
    if args.child:
        import torch

        torch.set_num_threads(THREADS)
        fn = {"q8_0": lambda: q8_0_part(args.quick), "gptq": lambda: gptq_part(args.quick),
              "q4_0": lambda: q4_0_part(args.quick, args.rtn, args.gptq_folder)}[args.child]
        print(json.dumps(fn(), default=str))
        return
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        ap.error(f"unknown parts {bad}; expected any of {PARTS}")
    parts = args.parts or (PARTS if args.quick else [])
    if args.quick:
        args.repeats = min(args.repeats, 2)
    result: dict[str, Any] = {}
    for part in parts:
        def run(part: str = part) -> dict[str, Any]:
            if part == "speed":
                return speed_part(args.quick, args.repeats)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part, *(["--quick"] if args.quick else []),
                   *(["--rtn"] if args.rtn else []), *(["--gptq-folder", args.gptq_folder] if args.gptq_folder else [])]
            return run_child(cmd, {**os.environ, "OMP_NUM_THREADS": str(THREADS)})
        result = merge_part("compress_gguf", part, args.quick, args.out, args, ["xllamacpp", "gguf", "numpy"], run,
                            summary, {**sizes(args.quick), "repeats": args.repeats})
        print(table(result), file=sys.stderr)
    if args.table or not parts:
        path = Path(args.out) if args.out else RESULTS / "compress_gguf.json"
        print(table(result or json.loads(path.read_text())["result"]))


if __name__ == "__main__":
    main()
