"""Does pruning keep the model? Magnitude, Wanda (Sun et al. 2023) and SparseGPT (Frantar & Alistarh 2023) at 50%
unstructured and 2:4 on SmolLM2-135M-Instruct: held-out bits per byte against the dense model, the sparsity
achieved per layer, the 2:4 pattern checked in every group of 4, reload exactness of the zeros, pruning seconds.

Each configuration runs in its own process: load SmolLM2 in float32, prune the block linears (in float32) with
`transforms.prune.prune` (Wanda and SparseGPT calibrated layer-sequentially on the same cached windows as GPTQ in
compress_quant.py: `calibration_windows(["{stdlib}"], tok, 128, 512, seed 0)`, the held-out modules excluded),
save the folder in bf16 (`pruning_config` in config.json), `lmforge.load` it back (every tensor compared with
torch.equal; the zeros against the float32 pruned weights) and score the reloaded model with the same evaluation
as compress_quant.py (`stdlib-ppl`: the held-out standard-library modules, disjoint windows of 2048 tokens, bf16),
so "dense" here is compress_quant.py's bf16 row. No speed is claimed: dense kernels run sparse weights at dense
speed here.

    python benchmarks/compress_prune.py dense magnitude-50 wanda-50     # merged into the results
    python benchmarks/compress_prune.py --quick                          # tiny random model, seconds
    python benchmarks/compress_prune.py --table
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from common import RESULTS
from compress_quant import (
    calibration,
    calibration_sized,
    heldout,
    main_for,
    scratch,
    source,
)

CONFIGS: dict[str, dict[str, Any] | None] = {  # name -> PruneConfig fields (None: the dense model)
    "dense": None,
    "magnitude-50": {"method": "magnitude", "sparsity": 0.5},
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "magnitude-2:4": {"method": "magnitude", "pattern": "2:4"},
    "wanda-2:4": {"method": "wanda", "pattern": "2:4"},
    "sparsegpt-2:4": {"method": "sparsegpt", "pattern": "2:4"},
    "magnitude-50-row": {"method": "magnitude", "sparsity": 0.5, "scope": "row"},
    "wanda-50-blockwise": {"method": "wanda", "sparsity": 0.5, "true_sequential": False},
    "wanda-50-calib32x2048": {"method": "wanda", "sparsity": 0.5, "calibration": (32, 2048)},
    "wanda-50-layer": {"method": "wanda", "sparsity": 0.5, "scope": "layer"},
}
"""The extras: magnitude per row; Wanda in its reference code's order (all linears of a block scored on the dense
block's inputs); Wanda on 32 windows of 2048 tokens (the same tokens in the context length it is scored at); Wanda
with one comparison group per matrix."""
QUICK_CONFIGS = ["dense", "magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2:4", "wanda-2:4"]


def prune_child(name: str, quick: bool) -> dict[str, Any]:
    """One configuration in this process: prune, save, reload, compare, score."""
    import lmforge
    import torch
    from lmforge.models.loading import save
    from lmforge.transforms.prune import (
        PruneConfig,
        prune,
        pruning_config,
        sparsity_report,
    )

    spec = dict(CONFIGS[name] or {})
    model, tok = source(quick)
    row: dict[str, Any] = {}
    path = scratch(f"prune-{name}", quick)
    extra: dict[str, Any] = {}
    if spec:
        size = spec.pop("calibration", None)
        cfg = PruneConfig(**spec)
        windows = None
        if cfg.method != "magnitude":
            windows, row["calibration"] = calibration_sized(tok, *size) if size and not quick else \
                calibration(tok, quick)
            extra["calibration"] = f"{row['calibration']['samples']} x {row['calibration']['seq_len']} stdlib tokens"
        row.update(method=cfg.method, target=cfg.pattern or cfg.target()[0], true_sequential=cfg.true_sequential,
                   **({} if cfg.pattern else {"scope": cfg.group_scope()}))
        t = time.perf_counter()
        prune(model, cfg, windows, progress=False)
        row["prune_s"] = round(time.perf_counter() - t, 1)
        extra = {"pruning_config": pruning_config(model, cfg, **extra)}
    pattern = spec.get("pattern")
    rep = sparsity_report(model, pattern)
    per_layer = [r["sparsity"] for r in rep["layers"].values()]
    row.update(sparsity=rep["sparsity"], layer_sparsity_min=min(per_layer), layer_sparsity_max=max(per_layer),
               layers=len(per_layer))
    if pattern:  # N:M checked here directly too: at least M - N zeros in every M consecutive inputs of every row
        n_keep, m = (int(x) for x in pattern.split(":"))
        groups = bad = 0
        for lin in (x for k, x in model.named_modules() if k.startswith("blocks.") and type(x) is torch.nn.Linear):
            zeros = (lin.weight == 0).reshape(lin.out_features, -1, m).sum(-1)  # (out, in / M)
            groups, bad = groups + zeros.numel(), bad + int((zeros < m - n_keep).sum())
        row.update(groups=groups, groups_short_of_zeros=bad, pattern_ok=bad == 0 and rep["pattern_ok"])
    zeros32 = {k: v == 0 for k, v in model.state_dict().items() if k.startswith("blocks.")}
    model = model.to(torch.bfloat16)  # scored in bf16, as compress_quant.py's quantized models and its bf16 row
    save(model, tok, path, dtype=torch.bfloat16, extra_config=extra or None)
    loaded, _ = lmforge.load(path)
    sd, back = model.state_dict(), loaded.state_dict()
    row["reload_exact"] = sd.keys() == back.keys() and all(torch.equal(sd[k], back[k]) for k in sd)
    row["reload_same_zeros"] = all(torch.equal(z, back[k] == 0) for k, z in zeros32.items())
    row.update(heldout(loaded, tok, quick, path))
    shutil.rmtree(path)
    return row


def summary(configs: dict[str, dict]) -> dict[str, Any]:
    """Ratios to dense and the issue's targets."""
    dense, dense_from = configs.get("dense"), "dense"
    if dense is None:  # not measured yet: compress_quant's bf16 row is the same model, save -> load and evaluation
        quant = RESULTS / "compress_quant.json"
        dense = json.loads(quant.read_text())["result"]["configs"].get("bf16") if quant.exists() else None
        dense_from = "compress_quant bf16" if dense else None
    ratio = {n: r["bpb"] / dense["bpb"] for n, r in configs.items() if dense and "bpb" in r}
    bpb = {n: r["bpb"] for n, r in configs.items() if "bpb" in r}
    t: dict[str, bool] = {}
    if "wanda-50" in ratio:
        t["wanda 50% <= 1.3x dense"] = ratio["wanda-50"] <= 1.3
    if "wanda-50" in bpb and "magnitude-50" in bpb:
        t["wanda 50% better than magnitude 50%"] = bpb["wanda-50"] < bpb["magnitude-50"]
    if "wanda-50" in bpb and "sparsegpt-50" in bpb:
        t["sparsegpt 50% <= wanda 50%"] = bpb["sparsegpt-50"] <= bpb["wanda-50"]
    return {"dense": dense_from, "bpb_over_dense": ratio, "targets": t}


if __name__ == "__main__":
    from tables import compress_prune as table  # the docs' own renderer

    main_for("compress_prune", CONFIGS, QUICK_CONFIGS, prune_child, summary, table, __doc__)
