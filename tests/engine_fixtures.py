"""Real-data fixtures for engine and pretrain tests: ~40 files of the Python standard library, a BPE and a
WordPiece tokenizer trained on them (vocab 512) and their token shards; built once per test session.

Import the fixtures into a test module (`from engine_fixtures import bpe_data  # noqa: F401`); the data is
cached per process, so modules that each import them still share one copy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

N_FILES = 40
_CACHE: dict[str, object] = {}


@dataclass(frozen=True)
class ShardData:
    """A trained tokenizer folder and the token shards it wrote."""

    tokenizer: Path
    shards: Path


def run_torchrun(nproc: int, *args: str, env: dict[str, str] | None = None, timeout: int = 240) -> None:
    """Run `args` (a script and its arguments, or "lmforge" and a verb's) in `nproc` local processes under torchrun
    (gloo on a free loopback port, one thread each); the test fails with the end of stderr when the run does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args[0] == "lmforge":
        args = ("--no-python", str(Path(sys.executable).parent / "lmforge"), *args[1:])
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
           "--master_addr=127.0.0.1", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def stdlib_files(n: int = N_FILES) -> list[Path]:
    """The first `n` `*.py` files of the standard library, sorted by name (a real code corpus)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    assert len(files) == n, f"expected {n} standard library files, found {len(files)}"
    return files


def _build(kind: str, root: Path) -> ShardData:
    from lmforge.data.shards import prepare_shards
    from lmforge.tokenizer.train import train_tokenizer

    files = stdlib_files()
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    tok = train_tokenizer(texts, kind=kind, vocab_size=512)
    tok_dir, shard_dir = root / f"{kind}-tokenizer", root / f"{kind}-shards"
    tok.save(tok_dir)
    prepare_shards([str(f) for f in files], str(tok_dir), shard_dir, validation_fraction=0.1, num_workers=1,
                   show_progress=False)
    return ShardData(tok_dir, shard_dir)


def _cached(kind: str, factory) -> ShardData:
    if kind not in _CACHE:
        _CACHE[kind] = _build(kind, factory.mktemp(f"engine-{kind}"))
    return _CACHE[kind]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory) -> ShardData:
    """Byte-level BPE (vocab 512) + its shards (train and validation splits) of the stdlib corpus."""
    return _cached("bpe", tmp_path_factory)


@pytest.fixture(scope="session")
def wordpiece_data(tmp_path_factory) -> ShardData:
    """WordPiece (vocab 512, BERT specials) + its shards of the stdlib corpus."""
    return _cached("wordpiece", tmp_path_factory)


def write_config(path: Path, run_dir: Path, shards: Path, **train) -> Path:
    """A tiny pretrain YAML (llama-tiny, seq_len 64, fp32) with `train` keys overriding the defaults."""
    import yaml

    t = dict(steps=12, micro_batch=4, grad_accum=2, log_every=1, eval_every=6, eval_batches=4, save_every=6,
             tensorboard=False, progress_bar=False, precision="fp32", device="cpu",
             optimizer={"lr": 3.0e-3}, schedule={"warmup_steps": 5})
    t.update(train)
    cfg = {"run_dir": str(run_dir), "model": {"preset": "llama-tiny"},
           "data": {"train": [str(shards)], "seq_len": 64}, "train": t}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def dump_config(cfg: dict, path: Path, **over) -> Path:
    """Write `cfg` as YAML to `path`, with dotted keys of `over` ("train.steps") set first."""
    import yaml

    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
