"""Inference on SmolLM2-135M: lmforge's engine and server vs `transformers` (static and continuous batching) and
llama.cpp (the prebuilt `xllamacpp` wheel), on the same weights.

1. single stream: decode tokens/s of one greedy request (128 new tokens, the 64-token prompt computed every time:
   our prefix cache off, llama.cpp's cache_prompt off), ours (bf16, and int8) vs `model.generate`, and llama.cpp on
   the same weights as a bf16 GGUF and the same int8 codes as a Q8_0 GGUF (plus the package's 4-bit Q4_1 GGUF for
   reference); each side in its own process, timed interleaved, best of the repeats;
2. 16 concurrent requests of mixed prompt (16..512 tokens) and output lengths (32..256): aggregate useful tokens/s and
   p50/p95 time to first token, each side in its own process, one side at a time. Ours: the OpenAI-compatible server, 16
   streaming clients of the official client in another process. Peers: `transformers` static batching (one left-padded
   `generate` running to the longest output), `transformers` continuous batching (`ContinuousBatchingManager`, paged
   attention, each request with its own length, the API under `generate_batch`), and llama.cpp's server (`xllamacpp`, 16
   slots, continuous batching, bf16 GGUF) under the same client. Every round sends a fresh set of 16 prompts (a warm-up
   set, then two measured sets, the same sets for every side; tokens/s = useful tokens / wall time over both measured
   sets), so no side reuses a cached prompt. The repeated-prompt workload - the last set sent again, so our prefix cache
   holds every prompt - is measured for ours separately and labelled as such;
3. speculative decoding by prompt lookup on a code-editing prompt vs plain decoding: tokens/s, identical output.

All sides run the same weights (the GGUF dequantized and saved as a Hugging Face folder, and that folder written
back as a bf16 GGUF for llama.cpp) in bf16 (`--dtype`), with end-of-sequence ignored so all produce the same
number of tokens, on the same number of threads. Prints a table; the record goes to benchmarks/results/inference.json.

    python benchmarks/inference.py [--dtype bfloat16] [--device cpu] [--random-init] [--out result.json]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import Record, add_out_argument


def _load(args, folder: Path):
    """Write the benchmark's weights (and tokenizer) to `folder`, the Hugging Face layout every side loads; ours
    loaded from it (for the GGUF exports and the prompt-lookup run in this process)."""
    import lmforge
    from lmforge.models import Transformer
    from lmforge.models.presets import preset

    if args.random_init:  # machines without the GGUF package: same architecture, random weights, token-id prompts
        torch.manual_seed(0)
        lmforge.save(Transformer(preset("smollm2-135m")), None, folder)
    else:
        model, tok = lmforge.load("smollm2-135m-instruct")
        lmforge.save(model, tok, folder)
    return lmforge.load(folder, dtype=getattr(torch, args.dtype), device=args.device)


def _transformers(cfg: dict):
    """The peer: transformers' model of the same folder, same dtype, end-of-sequence ignored (every side produces
    the same number of tokens)."""
    import transformers

    dtype = getattr(torch, cfg["dtype"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(cfg["folder"], dtype=dtype).to(cfg["device"]).eval()
    ref.generation_config.eos_token_id = None
    return ref


def _prompts(tok, vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts of mixed lengths (16..512 tokens) cut from real code (the Python standard library)."""
    import random

    rng = random.Random(seed)
    if tok is not None:
        import json as j
        import os

        text = "".join(inspect.getsource(m) for m in (j.decoder, j.encoder, os))
        ids = tok.encode(text)
    else:
        ids = [rng.randrange(vocab) for _ in range(20000)]
    out = []
    for _ in range(n):
        length = int(16 * 2 ** rng.uniform(0, 5))  # 16..512, log-uniform
        start = rng.randrange(len(ids) - length)
        out.append(ids[start:start + length])
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _single_side(side: str, cfg: dict):
    """Load one side of the single-stream comparison (in its own process); returns a function that generates
    cfg["new"] tokens greedily from cfg["prompt"] and returns (tokens generated, their ids or None)."""
    prompt, new, device = cfg["prompt"], cfg["new"], cfg["device"]
    if side.startswith("llama_cpp_"):
        server = _llama_server(Path(cfg["gguf"][side]), 1, 2048)
        req = {"prompt": prompt, "n_predict": new, "temperature": 0, "ignore_eos": True, "cache_prompt": False}

        def run_llama():
            return server.handle_completions(dict(req))["usage"]["completion_tokens"], None
        return run_llama
    if side == "transformers":
        ref = _transformers(cfg)
        x = torch.tensor([prompt], device=device)

        def run_ref():
            out = ref.generate(x, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
            _sync(device)
            return len(out), out
        return run_ref
    import lmforge
    from lmforge.inference.engine import Engine, EngineConfig, SamplingParams

    dtype = getattr(torch, cfg["dtype"])
    model = _int8(Path(cfg["folder"]), dtype) if side == "ours_int8" else lmforge.load(
        cfg["folder"], dtype=dtype, device=device)[0]
    engine = Engine(model, config=EngineConfig(prefix_caching=False))  # every repeat computes its prompt
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)

    def run_ours():
        out = engine.generate([prompt], params)[0].token_ids
        _sync(device)
        return len(out), out
    run_ours.decode_path = engine.decode_path
    return run_ours


def _side_worker(side: str) -> None:
    """`--single-side SIDE`: read the config line, load, warm up, then time one generation per 'go' line; every
    reply is one JSON line."""
    cfg = json.loads(sys.stdin.readline())
    run = _single_side(side, cfg)
    n, tokens = run()  # warm-up
    print(json.dumps({"n": n, "tokens": tokens, "decode_path": getattr(run, "decode_path", None)}), flush=True)
    for _ in sys.stdin:
        t = time.perf_counter()
        n, _ = run()
        print(json.dumps({"s": time.perf_counter() - t, "n": n}), flush=True)


def _reply(proc) -> dict:
    for line in proc.stdout:  # anything a library printed before the reply is skipped
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"single-stream side exited with code {proc.wait()}")


def single_stream(cfg: dict, sides: list[str], repeats: int) -> dict:
    """Tokens/s of one greedy request per side, each side in its own process (loaded and warmed up one after the
    other, then timed interleaved: each repeat runs every side once, best of `repeats`); how many leading tokens
    ours and transformers agree on. Ours runs with its prefix cache off, llama.cpp with cache_prompt off."""
    import subprocess

    procs, first = {}, {}
    try:
        for side in sides:
            procs[side] = subprocess.Popen([sys.executable, __file__, "--single-side", side], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
            procs[side].stdin.write(json.dumps(cfg) + "\n")
            procs[side].stdin.flush()
            first[side] = _reply(procs[side])
        best = dict.fromkeys(sides, float("inf"))
        for _ in range(repeats):
            for side, proc in procs.items():
                proc.stdin.write("go\n")
                proc.stdin.flush()
                r = _reply(proc)
                best[side] = min(best[side], r["s"] / r["n"])
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    a, b = first["ours"]["tokens"], first["transformers"]["tokens"]
    agree = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
    out = {"ours_tok_s": 1 / best["ours"], "peer_tok_s": 1 / best["transformers"],
           "ratio": best["transformers"] / best["ours"], "same_tokens": a == b, "agreeing_tokens": agree,
           "decode_path": first["ours"]["decode_path"], "processes": "one per side"}
    for side in sides:
        if side not in ("ours", "transformers"):
            out[f"{side}_tok_s"] = 1 / best[side]
    return out


def _client(url: str, requests: list[tuple[list[int], int]]) -> list[tuple[float, int]]:
    """The load generator: every request at once through the official async client, streaming; returns
    (time to first token, completion tokens) per request. Runs in its own process (see `concurrent`)."""
    import openai

    async def one(client, prompt, n):
        t0 = time.perf_counter()
        first, got = None, 0
        stream = await client.completions.create(model="smollm2", prompt=prompt, max_tokens=n, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                got = chunk.usage.completion_tokens
        return first if first is not None else time.perf_counter() - t0, got

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in requests))

    return asyncio.run(all_of_them())


def _q(xs: list[float], p: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]


def _load_generator(url: str, prompts: list[list[int]], max_tokens: list[int]) -> dict:
    """One round of requests from a separate client process; useful tokens/s and TTFT quantiles."""
    import subprocess

    job = json.dumps([[p, n] for p, n in zip(prompts, max_tokens)])
    out = subprocess.run([sys.executable, __file__, "--client", url], input=job, capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    tokens = sum(n for _, n in r["requests"])
    return {"wall_s": r["wall"], "tokens": tokens, "tok_s": tokens / r["wall"], "ttft": [f for f, _ in r["requests"]],
            "client_cpu_s": r["cpu_s"]}


def _measured(rounds: list[dict]) -> dict:
    """The measured rounds together (the first round is the warm-up): total useful tokens / total wall time, and
    TTFT quantiles over every request of those rounds; the same prompt sets on every side."""
    timed = rounds[1:]
    tokens, wall = sum(r["tokens"] for r in timed), sum(r["wall_s"] for r in timed)
    ttft = [f for r in timed for f in r["ttft"]]
    out = {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "ttft_p50_s": _q(ttft, 50),
           "ttft_p95_s": _q(ttft, 95), "rounds_tok_s": [round(r["tok_s"], 1) for r in rounds if r]}
    if "prefix_cache_hit_tokens" in timed[0]:  # ours: how much of the prompts the prefix cache served
        out.update({k: sum(r[k] for r in timed) for k in ("prefix_cache_hit_tokens", "prompt_tokens")})
    return out


def serve_ours(ours, tok, jobs: list[tuple[list[list[int]], list[int]]]) -> list[dict]:
    """Our server in this process as `lmforge serve` runs it (HTTP in a thread, the engine loop on the main thread),
    prefix caching on as served; each job is one round from the load-generator process."""
    import threading

    from lmforge.inference.bridge import AsyncEngine
    from lmforge.inference.engine import Engine
    from lmforge.inference.http import start_server
    from lmforge.inference.routes import create_app

    engine = Engine(ours, tok)
    aeng = AsyncEngine(engine, background=False)
    running = start_server(create_app(aeng, tok, "smollm2"), "127.0.0.1", 0)
    results: list[dict] = []

    def drive() -> None:
        try:
            for prompts, max_tokens in jobs:
                hits, seen = (engine.counters[k] for k in ("prefix_cache_hit_tokens", "prompt_tokens_total"))
                r = _load_generator(running.url, prompts, max_tokens)
                r["prefix_cache_hit_tokens"] = engine.counters["prefix_cache_hit_tokens"] - hits
                r["prompt_tokens"] = engine.counters["prompt_tokens_total"] - seen
                results.append(r)
        finally:
            aeng.close()  # ends aeng.run() below

    threading.Thread(target=drive).start()
    aeng.run()
    running.stop()
    return results


def static_batch(ref, prompts: list[list[int]], max_tokens: list[int], device: str) -> dict:
    """transformers' static batching: one left-padded `generate` running to the longest output; every request's
    first token arrives after the whole batch's prefill."""
    import transformers

    class _Clock(transformers.LogitsProcessor):
        def __init__(self):
            self.first = None

        def __call__(self, input_ids, scores):
            if self.first is None:
                _sync(device)
                self.first = time.perf_counter()
            return scores

    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    clock = _Clock()
    t = time.perf_counter()
    ref.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(max_tokens), do_sample=False,
                 pad_token_id=0, logits_processor=[clock])
    _sync(device)
    wall = time.perf_counter() - t
    tokens = sum(max_tokens)  # useful tokens: each request's own length
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "ttft": [clock.first - t] * len(prompts)}


def continuous_batch(ref, prompts: list[list[int]], max_tokens: list[int]) -> dict:
    """transformers' continuous batching (the manager under `generate_batch`, paged KV cache), every request with
    its own max_new_tokens, all submitted at once; TTFT from each request's creation to its first token."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max(max_tokens), eos_token_id=None, pad_token_id=0)
    with ref.continuous_batching_context_manager(generation_config=cfg, block=True, timeout=30) as manager:
        t = time.perf_counter()  # after the manager's set-up and warm-up, as our server is up before its clients
        ids = [manager.add_request(p, max_new_tokens=n, record_timestamps=True, eos_token_id=-1)
               for p, n in zip(prompts, max_tokens)]
        done: dict = {}
        while len(done) < len(ids):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                done[r.request_id] = r
            elif r is None and not manager.is_running():
                raise RuntimeError("transformers continuous batching stopped")
        wall = time.perf_counter() - t
    outs = [done[i] for i in ids]
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(errors[0])
    tokens = sum(len(o.generated_tokens) for o in outs)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "ttft": [o.timestamps[0] - o.created_time for o in outs if o.timestamps]}


def _llama_server(gguf: Path, slots: int, n_ctx: int):
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = str(gguf)
    p.n_parallel, p.n_ctx, p.port, p.warmup = slots, n_ctx, 0, True
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = torch.get_num_threads()
    p.cont_batching = True
    return xllamacpp.Server(p)


def llama_cpp_concurrent(gguf: Path, jobs: list[tuple[list[list[int]], list[int]]]) -> list[dict]:
    longest = max(len(p) + n for prompts, max_tokens in jobs for p, n in zip(prompts, max_tokens))
    server = _llama_server(gguf, len(jobs[0][0]), len(jobs[0][0]) * (longest + 16))
    url = server.listening_address
    out = [_load_generator(url, prompts, max_tokens) for prompts, max_tokens in jobs]
    del server
    return out


def _concurrent_side(side: str, cfg: dict) -> list[dict]:
    """`--concurrent-side SIDE` (in its own process): every round of cfg["jobs"] on one side; ours also runs the
    last round again (every prompt in its prefix cache)."""
    jobs = cfg["jobs"]  # [prompts, max_tokens] per round
    if side == "llama_cpp_bf16":
        return llama_cpp_concurrent(Path(cfg["gguf"][side]), jobs)
    if side == "ours":
        import lmforge

        model, tok = lmforge.load(cfg["folder"], dtype=getattr(torch, cfg["dtype"]), device=cfg["device"])
        return serve_ours(model, tok, jobs + [jobs[-1]])
    ref = _transformers(cfg)
    if side == "transformers_static":
        return [static_batch(ref, p, n, cfg["device"]) for p, n in jobs]
    return [continuous_batch(ref, p, n) for p, n in jobs]


def concurrent(side: str, cfg: dict) -> list[dict]:
    """One concurrent side's rounds, run in a fresh process (only one side runs at a time)."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--concurrent-side", side], input=json.dumps(cfg),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{side} exited with code {out.returncode}: {out.stderr.strip()[-300:]}")
    return json.loads(lines[-1])["rounds"]


def _int8(folder: Path, dtype):
    """The benchmark's weights with every block linear rounded to int8 in groups of 32 (float16 scales): the
    values of llama.cpp's Q8_0; embedding and tied head stay in `dtype` on both sides."""
    import lmforge
    from lmforge.transforms.quant import quantize_rtn

    model, _ = lmforge.load(folder, dtype=dtype)
    return quantize_rtn(model, 8, 32, True)


def _gguf_paths(ours, int8, tok, folder: Path) -> dict[str, Path]:
    """The same weights as a bf16 GGUF and, from the same int8 codes, a Q8_0 GGUF (both written by lmforge), and
    the package's Q4_1 GGUF."""
    from lmforge.models.gguf import save_gguf
    from lmforge.models.loading import resolve

    bf16 = save_gguf(ours, tok, folder / "smollm2-bf16.gguf", dtype="bf16")
    q8 = save_gguf(int8, tok, folder / "smollm2-q8_0.gguf", dtype="bf16")
    return {"bf16": Path(bf16), "Q8_0": Path(q8), "Q4_1": Path(resolve("smollm2-135m-instruct"))}


def prefill_bound(cfg, prompts: list[list[int]], peak: float) -> float:
    """Seconds to compute the prompts' matmuls at `peak` FLOP/s: 2 FLOPs per weight of the block linears per
    token, plus attention's 4·H·D FLOPs per layer per (query, earlier key) pair; the head runs once per prompt."""
    d = cfg.head_dim
    per_token = 2 * cfg.num_layers * cfg.hidden_size * ((cfg.num_heads + 2 * cfg.num_kv_heads) * d
                                                        + cfg.num_heads * d + 3 * cfg.intermediate_size)
    attn = sum(4 * cfg.num_layers * cfg.num_heads * d * len(p) * (len(p) + 1) // 2 for p in prompts)
    head = 2 * cfg.vocab_size * cfg.hidden_size * len(prompts)
    return (per_token * sum(len(p) for p in prompts) + attn + head) / peak


def speculative(ours, tok, vocab: int, new: int, repeats: int) -> dict:
    import textwrap

    from lmforge.inference.engine import Engine, EngineConfig, SamplingParams

    code = textwrap.dedent(inspect.getsource(textwrap.TextWrapper._split))
    if tok is not None:
        from lmforge.tokenizer.chat import encode_chat

        msg = f"Rewrite this function with type hints and no comments:\n```python\n{code}```"
        prompt = encode_chat(tok, [{"role": "user", "content": msg}], add_generation_prompt=True).ids
    else:
        prompt = _prompts(None, vocab, 1, seed=3)[0]
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    out = {}
    for kind in ("none", "ngram"):
        engine = Engine(ours, tok, EngineConfig(speculative=kind, num_speculative_tokens=8, ngram_max=4,
                                                prefix_caching=False))
        tokens = engine.generate([prompt], params)[0].token_ids
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            engine.generate([prompt], params)
            best = min(best, time.perf_counter() - t)
        s = engine.stats()
        out[kind] = {"tok_s": new / best, "tokens": tokens,
                     "acceptance": s["draft_tokens_accepted"] / max(1, s["draft_tokens_total"])}
    return {"plain_tok_s": out["none"]["tok_s"], "ngram_tok_s": out["ngram"]["tok_s"],
            "ratio": out["ngram"]["tok_s"] / out["none"]["tok_s"],
            "identical": out["none"]["tokens"] == out["ngram"]["tokens"],
            "acceptance": out["ngram"]["acceptance"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-init", action="store_true", help="random SmolLM2-shaped weights (no GGUF needed)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16, help="concurrent requests per round")
    ap.add_argument("--sides", default="ours,static,continuous,llama_cpp",
                    help="concurrent sides to run (ours,static,continuous,llama_cpp)")
    add_out_argument(ap)
    ap.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # internal: the load-generator process
    ap.add_argument("--single-side", help=argparse.SUPPRESS)  # internal: one side of the single-stream runs
    ap.add_argument("--concurrent-side", help=argparse.SUPPRESS)  # internal: one side of the concurrent rounds
    args = ap.parse_args()
    if args.single_side:
        return _side_worker(args.single_side)
    if args.concurrent_side:
        print(json.dumps({"rounds": _concurrent_side(args.concurrent_side, json.loads(sys.stdin.read()))}))
        return
    if args.client:
        requests = json.loads(sys.stdin.read())
        t = time.perf_counter()
        results = _client(args.client, requests)
        print(json.dumps({"wall": time.perf_counter() - t, "cpu_s": time.process_time(), "requests": results}))
        return
    rec = Record("inference", args, peers=["transformers", "xllamacpp", "openai"],
                 sizes={"new_tokens": args.new_tokens, "repeats": args.repeats, "requests": args.requests,
                        "rounds": 3, "prompt_tokens": "16..512 log-uniform", "output_tokens": [32, 64, 128, 256]})
    sides = args.sides.split(",")
    import random

    with tempfile.TemporaryDirectory() as d:
        ours, tok = _load(args, Path(d) / "smollm2")
        vocab = ours.cfg.vocab_size
        prompt = _prompts(tok, vocab, 1, seed=1)[0][:64]
        llama = tok is not None and args.device == "cpu" and "llama_cpp" in sides
        int8 = _int8(Path(d) / "smollm2", getattr(torch, args.dtype)) if args.device == "cpu" else None
        ggufs = _gguf_paths(ours, int8, tok, Path(d)) if llama else {}
        result: dict = {"device": args.device, "dtype": args.dtype, "random_init": args.random_init,
                        "threads": torch.get_num_threads()}
        single = ["ours", "transformers"] + (["ours_int8"] if int8 is not None else [])
        single += [f"llama_cpp_{q.lower()}" for q in ggufs]
        cfg = {"folder": str(Path(d) / "smollm2"), "prompt": prompt, "new": args.new_tokens, "dtype": args.dtype,
               "device": args.device, "gguf": {f"llama_cpp_{q.lower()}": str(g) for q, g in ggufs.items()}}
        result["single_stream"] = single_stream(cfg, single, args.repeats)

        rng = random.Random(2)
        jobs = []  # warm-up round, then two measured rounds: a fresh prompt set each, the same sets for every side
        for r in range(3):
            prompts = _prompts(tok, vocab, args.requests, seed=100 + r)
            jobs.append((prompts, [rng.choice([32, 64, 128, 256]) for _ in prompts]))
        conc: dict = {"requests": args.requests, "prompt_tokens": [sum(len(p) for p in j[0]) for j in jobs]}
        from train_throughput import matmul_peak

        # the bound at the bf16 GEMM's measured peak (the issue's definition) and at the fastest this machine
        # multiplies (stricter where a bf16 GEMM is slower than float32: CPUs without native bf16)
        bf16_peak = matmul_peak("bf16")
        peak = max(bf16_peak, matmul_peak("fp32")) if args.device == "cpu" else bf16_peak
        conc["matmul_peak_tflops"], conc["bf16_matmul_peak_tflops"] = peak / 1e12, bf16_peak / 1e12
        conc["prefill_bound_s"] = [prefill_bound(ours.cfg, j[0], peak) for j in jobs]
        cfg["jobs"] = jobs
        if "ours" in sides:
            rounds = concurrent("ours", cfg)  # + the last set again: every prompt cached
            conc["ours"] = _measured(rounds[:3])
            conc["ours"]["ttft_p95_over_bound"] = max(_q(r["ttft"], 95) / b for r, b in
                                                      zip(rounds[1:3], conc["prefill_bound_s"][1:3]))
            conc["ours"]["ttft_p95_over_bf16_bound"] = conc["ours"]["ttft_p95_over_bound"] * bf16_peak / peak
            conc["ours_repeated_prompts"] = _measured([{}, rounds[3]])
        peers = [p for p, flag in (("transformers_static", "static"), ("transformers_continuous", "continuous"),
                                   ("llama_cpp_bf16", "llama_cpp")) if flag in sides and (flag != "llama_cpp" or llama)]
        for peer in peers:
            try:
                conc[peer] = _measured(concurrent(peer, cfg))
            except RuntimeError as e:  # a peer that cannot run is reported, not fatal
                conc[peer] = {"error": str(e)}
        o = conc.get("ours", {})
        for peer in ("transformers_static", "transformers_continuous", "llama_cpp_bf16"):
            if "tok_s" in conc.get(peer, {}) and o:
                conc[f"ratio_vs_{peer}"] = o["tok_s"] / conc[peer]["tok_s"]
        result["concurrent"] = conc
        result["speculative"] = speculative(ours, tok, vocab, 2 * args.new_tokens, args.repeats)
    s, c, p = result["single_stream"], result["concurrent"], result["speculative"]
    print(f"SmolLM2-135M, {args.dtype} on {args.device} ({result['threads']} threads)"
          + (", random weights" if args.random_init else ""))
    print(f"{'measure':52} {'ours':>9} {'peer':>9} {'ratio':>6}")
    print(f"{'single-stream decode tok/s (vs transformers generate)':52} {s['ours_tok_s']:9.1f} "
          f"{s['peer_tok_s']:9.1f} {s['ratio']:6.2f}")
    for q, mine in (("bf16", "ours_tok_s"), ("q8_0", "ours_int8_tok_s"), ("q4_1", "ours_tok_s")):
        if f"llama_cpp_{q}_tok_s" in s and mine in s:
            v = s[f"llama_cpp_{q}_tok_s"]
            print(f"{'single-stream decode tok/s (' + mine[:-6] + ' vs llama.cpp ' + q + ')':52} {s[mine]:9.1f} "
                  f"{v:9.1f} {s[mine] / v:6.2f}")
    o = c.get("ours")
    for peer in ("transformers_static", "transformers_continuous", "llama_cpp_bf16"):
        r = c.get(peer)
        if r is None:
            continue
        if "error" in r:
            print(f"{args.requests} concurrent vs {peer}: {r['error']}")
            continue
        if o:
            print(f"{f'{args.requests} concurrent tok/s, fresh prompts (vs {peer})':52} {o['tok_s']:9.1f} "
                  f"{r['tok_s']:9.1f} {o['tok_s'] / r['tok_s']:6.2f}")
            print(f"{'  TTFT p50 / p95 s':52} {o['ttft_p50_s']:4.2f}/{o['ttft_p95_s']:4.2f} "
                  f"{r['ttft_p50_s']:4.2f}/{r['ttft_p95_s']:4.2f}")
    if "ours_repeated_prompts" in c:
        r = c["ours_repeated_prompts"]
        print(f"{'ours, repeated prompts (prefix cache hit): tok/s':52} {r['tok_s']:9.1f}   TTFT p50 "
              f"{r['ttft_p50_s']:.2f} s")
    print(f"{'prompt lookup tok/s (vs plain engine)':52} {p['ngram_tok_s']:9.1f} {p['plain_tok_s']:9.1f} "
          f"{p['ratio']:6.2f}   identical={p['identical']} acceptance={p['acceptance']:.2f}")
    rec.write(result)


if __name__ == "__main__":
    main()
