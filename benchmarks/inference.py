"""Inference on SmolLM2-135M: lmforge's engine and server vs `transformers` generate, in one process.

1. single stream: decode tokens/s of one greedy request (128 new tokens), ours vs `model.generate`;
2. 16 concurrent requests of mixed prompt and output lengths: ours through the OpenAI-compatible server (the
   official client, streaming, continuous batching) vs `transformers` static batching of the same requests
   (one left-padded `generate` call running to the longest output); aggregate useful tokens/s and p50/p95 time
   to first token;
3. speculative decoding by prompt lookup on a code-editing prompt vs plain decoding: tokens/s, identical output;
4. llama.cpp (`llama_cpp`, optional) on the GGUF, single stream, for reference (its weights are 4-bit there).

Both sides use the same weights (the GGUF dequantized and saved as a Hugging Face folder, so `transformers`
runs dense weights, not its GGUF kernels) in the same dtype, with end-of-sequence ignored so both produce the
same number of tokens. Prints a table and a JSON line.

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


def _load(args, folder: Path):
    import lmforge
    from lmforge.models import Transformer
    from lmforge.models.presets import preset

    dtype = getattr(torch, args.dtype)
    if args.random_init:  # machines without the GGUF package: same architecture, random weights, token-id prompts
        torch.manual_seed(0)
        lmforge.save(Transformer(preset("smollm2-135m")), None, folder)
        tok = None
    else:
        model, tok = lmforge.load("smollm2-135m-instruct")
        lmforge.save(model, tok, folder)
    ours, _ = lmforge.load(folder, dtype=dtype, device=args.device)
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    ref.generation_config.eos_token_id = None  # both sides ignore end-of-sequence: same number of tokens
    return ours, tok, ref


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


def single_stream(ours, ref, prompt: list[int], new: int, device: str, repeats: int) -> dict:
    from lmforge.inference.engine import Engine, SamplingParams

    engine = Engine(ours)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    x = torch.tensor([prompt], device=device)

    def run_ours():
        return engine.generate([prompt], params)[0].token_ids

    def run_ref():
        return ref.generate(x, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()

    times = {}
    outs = {}
    for name, fn in (("ours", run_ours), ("transformers", run_ref)):
        outs[name] = fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t)
        times[name] = new / best
    return {"ours_tok_s": times["ours"], "peer_tok_s": times["transformers"],
            "ratio": times["ours"] / times["transformers"], "same_tokens": outs["ours"] == outs["transformers"]}


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


def concurrent(ours, tok, ref, prompts: list[list[int]], max_tokens: list[int], device: str) -> dict:
    import subprocess

    from lmforge.inference.engine import Engine
    from lmforge.inference.server import AsyncEngine, create_app, start_server

    # ours: the server in this process as `lmforge serve` runs it (HTTP in a thread, the engine loop on the main
    # thread); the 16 streaming clients in another process, as a real load generator is
    aeng = AsyncEngine(Engine(ours, tok), background=False)
    running = start_server(create_app(aeng, tok, "smollm2"), "127.0.0.1", 0)
    job = json.dumps([[p, n] for p, n in zip(prompts, max_tokens)])
    runs = []

    def load_generator() -> None:
        for _ in range(3):  # warm-up, then the better of two measured runs
            out = subprocess.run([sys.executable, __file__, "--client", running.url], input=job,
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        aeng.close()  # ends aeng.run() below

    import threading

    threading.Thread(target=load_generator).start()
    aeng.run()
    running.stop()
    results = min(runs[1:], key=lambda r: r["wall"])
    print(f"client process: {results['cpu_s']:.1f} s CPU over {results['wall']:.1f} s", file=sys.stderr)
    ours_wall = results["wall"]  # first request sent to last token received, in the client
    ours_tokens = sum(n for _, n in results["requests"])
    ours_ttft = [f for f, _ in results["requests"]]

    # peer: one static batch, left-padded, runs until the longest request is done
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
    ids, mask = ids.to(device), mask.to(device)
    peer = []
    for _ in range(3):  # warm-up, then the better of two measured runs
        clock = _Clock()
        t = time.perf_counter()
        ref.generate(ids, attention_mask=mask, max_new_tokens=max(max_tokens), do_sample=False, pad_token_id=0,
                     logits_processor=[clock])
        _sync(device)
        peer.append((time.perf_counter() - t, clock.first - t))
    peer_wall, peer_first = min(peer[1:])
    peer_tokens = sum(max_tokens)  # useful tokens: each request's own length
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return {"requests": len(prompts), "ours_tok_s": ours_tokens / ours_wall, "peer_tok_s": peer_tokens / peer_wall,
            "ratio": (ours_tokens / ours_wall) / (peer_tokens / peer_wall),
            "ours_ttft_p50_s": q(ours_ttft, 50), "ours_ttft_p95_s": q(ours_ttft, 95),
            "peer_ttft_p50_s": peer_first, "peer_ttft_p95_s": peer_first,
            "ours_tokens": ours_tokens, "peer_useful_tokens": peer_tokens}


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
            "ratio": out["ngram"]["tok_s"] / out["none"]["tok_s"], "identical": out["none"]["tokens"] == out["ngram"]["tokens"],
            "acceptance": out["ngram"]["acceptance"]}


def llama_cpp(prompt_text: str, new: int) -> dict:
    try:
        import llama_cpp
    except ImportError:
        return {"error": "llama_cpp not installed (pip install llama-cpp-python builds it from source)"}
    from lmforge.models.loading import resolve

    llm = llama_cpp.Llama(str(resolve("smollm2-135m-instruct")), n_ctx=2048, n_threads=torch.get_num_threads(),
                          verbose=False)
    llm(prompt_text, max_tokens=8)
    t = time.perf_counter()
    out = llm(prompt_text, max_tokens=new, temperature=0, ignore_eos=True) if "ignore_eos" in inspect.signature(
        llm.__call__).parameters else llm(prompt_text, max_tokens=new, temperature=0)
    n = out["usage"]["completion_tokens"]
    return {"tok_s": n / (time.perf_counter() - t), "quantization": "Q4_1 (the package's GGUF)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--random-init", action="store_true", help="random SmolLM2-shaped weights (no GGUF needed)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)  # internal: the load-generator process
    args = ap.parse_args()
    if args.client:
        requests = json.loads(sys.stdin.read())
        t = time.perf_counter()
        results = _client(args.client, requests)
        print(json.dumps({"wall": time.perf_counter() - t, "cpu_s": time.process_time(), "requests": results}))
        return
    with tempfile.TemporaryDirectory() as d:
        ours, tok, ref = _load(args, Path(d) / "smollm2")
        vocab = ours.cfg.vocab_size
        prompt = _prompts(tok, vocab, 1, seed=1)[0][:64]
        result = {"device": args.device, "dtype": args.dtype, "random_init": args.random_init,
                  "threads": torch.get_num_threads()}
        result["single_stream"] = single_stream(ours, ref, prompt, args.new_tokens, args.device, args.repeats)
        import random

        rng = random.Random(2)
        prompts = _prompts(tok, vocab, 16, seed=2)
        max_tokens = [rng.choice([32, 64, 128, 256]) for _ in prompts]
        result["concurrent"] = concurrent(ours, tok, ref, prompts, max_tokens, args.device)
        result["speculative"] = speculative(ours, tok, vocab, 2 * args.new_tokens, args.repeats)
        if tok is not None and args.device == "cpu":
            result["llama_cpp"] = llama_cpp(tok.decode(prompt), args.new_tokens)
    s, c, p = result["single_stream"], result["concurrent"], result["speculative"]
    print(f"SmolLM2-135M, {args.dtype} on {args.device} ({result['threads']} threads)"
          + (", random weights" if args.random_init else ""))
    print(f"{'measure':44} {'ours':>10} {'peer':>10} {'ratio':>6} {'target':>7}")
    print(f"{'single-stream decode tok/s (vs transformers)':44} {s['ours_tok_s']:10.1f} {s['peer_tok_s']:10.1f} "
          f"{s['ratio']:6.2f} {'>= 3':>7}")
    print(f"{'16 concurrent: aggregate tok/s (vs static)':44} {c['ours_tok_s']:10.1f} {c['peer_tok_s']:10.1f} "
          f"{c['ratio']:6.2f} {'>= 4':>7}")
    print(f"{'16 concurrent: TTFT p50 s':44} {c['ours_ttft_p50_s']:10.2f} {c['peer_ttft_p50_s']:10.2f}")
    print(f"{'16 concurrent: TTFT p95 s':44} {c['ours_ttft_p95_s']:10.2f} {c['peer_ttft_p95_s']:10.2f}")
    print(f"{'prompt lookup tok/s (vs plain engine)':44} {p['ngram_tok_s']:10.1f} {p['plain_tok_s']:10.1f} "
          f"{p['ratio']:6.2f} {'>= 1.5':>7}   identical={p['identical']} acceptance={p['acceptance']:.2f}")
    if "llama_cpp" in result:
        lc = result["llama_cpp"]
        if "error" in lc:
            print(f"llama.cpp: {lc['error']}")
        else:
            print(f"{'llama.cpp single stream tok/s (Q4_1)':44} {s['ours_tok_s']:10.1f} {lc['tok_s']:10.1f} "
                  f"{s['ours_tok_s'] / lc['tok_s']:6.2f}")
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
