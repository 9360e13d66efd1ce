"""Quality of a pretraining run: validation bits per byte of the final model vs `xz -9e` on the same text.

Reads the run's config.yaml for the shard directory and sequence length, scores every non-overlapping window of
the validation split with the final model (fp32), and compresses exactly the scored text as one raw LZMA2 stream,
preset 9 extreme (`lmforge.eval.tasks.xz_bits_per_byte`: `xz -9e` without the container's fixed bytes). Target
(issue: pretraining): model bpb <= 0.85 x xz bpb. Prints a table; the record goes to
benchmarks/results/pretrain_quality.json.

    python benchmarks/pretrain_quality.py runs/pretrain/stdlib-small
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from common import Record, add_out_argument


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--batch", type=int, default=16)
    add_out_argument(ap)
    args = ap.parse_args()
    rec = Record("pretrain_quality", args, sizes={"run": args.run_dir})

    import lmforge
    from lmforge.data.loader import TokenWindows
    from lmforge.eval.tasks import xz_bits_per_byte

    run = Path(args.run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    data_dir, seq = cfg["data"]["train"][0], cfg["data"]["seq_len"]
    model, tok = lmforge.load(run / "final")
    windows = TokenWindows(data_dir, "validation", seq + 1, stride=seq)
    nll, targets = 0.0, []
    with torch.no_grad():
        for a in range(0, len(windows), args.batch):
            x = torch.stack([torch.from_numpy(windows.window(i)) for i in range(a, min(a + args.batch, len(windows)))])
            logits = model(x[:, :-1]).logits.float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            targets += x[:, 1:].reshape(-1).tolist()
    decoded = tok.decode(targets, skip_special_tokens=True)
    text = decoded.encode("utf-8")
    model_bpb = nll / math.log(2) / len(text)
    xz_bpb = xz_bits_per_byte([decoded])
    row = {"run": str(run), "xz": "raw LZMA2 stream, preset 9 extreme, over the scored text",
           "val_tokens": len(targets), "val_bytes": len(text),
           "model_bpb": model_bpb, "xz9e_bpb": xz_bpb, "ratio": model_bpb / xz_bpb, "target_ratio": 0.85,
           "parameters": model.num_parameters(), "train_tokens": _train_tokens(run),
           "train_steps": cfg["train"]["steps"]}
    print(f"{'text':12} {'bytes':>9} {'model bpb':>10} {'xz -9e bpb':>10} {'ratio':>6} {'target':>7}")
    print(f"{'validation':12} {len(text):9d} {model_bpb:10.4f} {xz_bpb:10.4f} {row['ratio']:6.3f} {'<=0.85':>7}")
    rec.write(row)


def _train_tokens(run: Path) -> int | None:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return max((r.get("tokens", 0) for r in rows), default=None)


if __name__ == "__main__":
    main()
