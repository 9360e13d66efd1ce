"""`lmforge prune --model M --method magnitude|wanda|sparsegpt --sparsity 0.5 | --pattern 2:4 --output DIR`:
exact zeros in the linear layers inside the blocks (embeddings, norms and the LM head untouched), unstructured or
N:M, calibrated layer by layer for Wanda and SparseGPT. The pruned model is a normal float folder (config.json
carries `pruning_config`) that reloads with the same zeros, checked before anything is reported. Writes
compress.json: size, held-out bits per byte, a task metric and decode tokens/s before and after, and the achieved
sparsity of every layer. No speed-up is claimed: dense kernels run the zeros (2:4 sparse kernels are CUDA-only).
See docs/compression.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..eval.compression import CompressEval

POSITIONAL = ("model",)


@dataclass
class Config:
    model: str
    """Model to prune: a Hugging Face folder, a .gguf file, a hub id or a local alias (smollm2-135m-instruct)."""
    method: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    """magnitude: |W|; wanda: |W|·‖X‖ (Sun et al. 2023); sparsegpt: OBS mask and update (Frantar & Alistarh 2023)."""
    sparsity: float | None = None
    """Fraction of zeros in each comparison group, in [0, 1) (default 0.5 when no pattern is given)."""
    pattern: str | None = None
    """N:M semi-structured sparsity instead of sparsity, e.g. "2:4": in every M consecutive inputs keep N."""
    scope: Literal["row", "layer"] | None = None
    """magnitude / wanda unstructured: compare within each output row or the whole matrix (default: layer for
    magnitude, row for wanda, as their papers)."""
    blocksize: int = 128
    """sparsegpt: columns per mask selection and lazy update."""
    damp: float = 0.01
    """sparsegpt: dampening added to the Hessian's diagonal, as a fraction of its mean."""
    calibration: list[str] = field(default_factory=lambda: ["{stdlib}"])
    """wanda / sparsegpt: calibration text (files, folders, globs, {stdlib}); the standard library's held-out
    modules and tests are left out, so held-out bits per byte stay held out."""
    calibration_samples: int = 128
    """wanda / sparsegpt: calibration windows."""
    calibration_seq_len: int = 512
    """wanda / sparsegpt: tokens per calibration window."""
    seed: int = 0
    """Seed of the calibration windows."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype the pruned model is saved and measured in (pruning itself runs in float32)."""
    output: str = "runs/prune"
    """The pruned model's folder."""
    eval: CompressEval = field(default_factory=CompressEval)
    """What compress.json measures before and after."""

    def transform(self) -> Any:
        from ..transforms.prune import PruneConfig

        return PruneConfig(self.method, self.sparsity, self.pattern, self.scope, self.blocksize, self.damp)

    def validate(self) -> None:
        self.transform().validate()
        if self.calibration_samples < 1 or self.calibration_seq_len < 2:
            raise ValueError(f"calibration_samples must be >= 1 and calibration_seq_len >= 2, found "
                             f"{self.calibration_samples}, {self.calibration_seq_len}")
        if self.output.endswith(".gguf"):
            raise ValueError(f"output {self.output}: prune writes a model folder; convert it to GGUF afterwards")


def main(cfg: Config) -> int:
    import time

    import torch

    from ..eval.compression import load_measured, report_saved
    from ..models.loading import save
    from ..transforms.prune import prune, pruning_config, sparsity_report

    dtype = getattr(torch, cfg.dtype)
    model, tok, before = load_measured(cfg.model, dtype, cfg.eval, "prune")
    pc = cfg.transform()
    windows = None
    if cfg.method != "magnitude":
        from ..data.calibration import calibration_windows

        windows = calibration_windows(cfg.calibration, tok, cfg.calibration_samples, cfg.calibration_seq_len,
                                      cfg.seed)
    t = time.perf_counter()
    model = prune(model.float(), pc, windows)  # scores, Hessians and updates in float32
    seconds = time.perf_counter() - t
    model = model.to(dtype)
    report = sparsity_report(model, cfg.pattern)
    extra = {} if windows is None else {"calibration": list(windows.shape)}
    out = save(model, tok, cfg.output, extra_config={"pruning_config": pruning_config(model, pc, **extra)})
    print(f"wrote {out} ({cfg.method}, {cfg.pattern or f'sparsity {pc.target()[0]:g}'}) in {seconds:.1f} s")
    print(_sparsity_summary(report))

    def same_zeros(reloaded: Any) -> None:
        again = sparsity_report(reloaded, cfg.pattern)
        if again["layers"] != report["layers"]:
            raise RuntimeError(f"{out}: the reloaded model's zeros differ from the pruned model's")

    report_saved(out, "prune", cfg, before, tok, cfg.eval, dtype,
                 {"seconds": round(seconds, 1), "sparsity": report}, check=same_zeros)
    return 0


def _sparsity_summary(report: dict[str, Any]) -> str:
    """One line per kind of layer (q, k, ..., down): the least and most sparse block, and the total."""
    kinds: dict[str, list[float]] = {}
    for name, row in report["layers"].items():
        kinds.setdefault(name.split(".", 2)[-1], []).append(row["sparsity"])
    lines = [f"  {kind:<14} sparsity {min(v):.4f} .. {max(v):.4f} over {len(v)} blocks" for kind, v in kinds.items()]
    ok = "" if "pattern_ok" not in report else f", {report['pattern']} in every group: {report['pattern_ok']}"
    return "\n".join([*lines, f"  total          {report['sparsity']:.4f} of {report['weights']:,} weights{ok}"])
