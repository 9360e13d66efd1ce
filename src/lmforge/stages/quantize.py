"""`lmforge quantize --model M --method rtn|gptq|nf4 --bits 8|4 [--group-size 32|64|128] --output DIR|FILE.gguf`:
weight-only quantization of the linear layers inside the blocks (norms stay float; the token embedding, and a tied
LM head with it, is stored int8 per row with embedding=true),
saved as a folder that `lmforge.load` rebuilds exactly (same integer codes and scales) or as a GGUF file of
llama.cpp blocks packed from those codes (Q8_0: 8 bits symmetric, Q4_0: 4 bits symmetric, Q4_1: 4 bits
asymmetric, all with group_size 32). Writes compress.json: size, held-out bits per byte, a task metric and decode
tokens/s before and after. See docs/compression.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..eval.compression import CompressEval

POSITIONAL = ("model",)


@dataclass
class Config:
    model: str
    """Model to quantize: a Hugging Face folder, a .gguf file, a hub id or a local alias (smollm2-135m-instruct)."""
    method: Literal["rtn", "gptq", "nf4"] = "rtn"
    """rtn: round to nearest; gptq: GPTQ (Frantar et al. 2022), error-compensating, calibrated on `calibration`;
    nf4: 4-bit NormalFloat in blocks of 64 with double-quantized scales (QLoRA's, through bitsandbytes; bits 4)."""
    bits: Literal[4, 8] = 8
    """Bits per weight."""
    group_size: int | None = None
    """Input columns sharing one scale (32, 64, 128); null: one scale per output channel. GGUF needs 32."""
    symmetric: bool = True
    """Symmetric codes around zero (scale only) or asymmetric (scale and minimum)."""
    embedding: bool = False
    """Also store the token embedding (with tied embeddings, the output head too) as int8, one scale per token."""
    act_order: bool = False
    """gptq: quantize columns in order of decreasing Hessian diagonal (groups stay on the original columns)."""
    damp: float = 0.01
    """gptq: dampening added to the Hessian's diagonal, as a fraction of its mean."""
    calibration: list[str] = field(default_factory=lambda: ["{stdlib}"])
    """gptq: calibration text (files, folders, globs, {stdlib}); the standard library's held-out modules and
    tests are left out, so held-out bits per byte stay held out."""
    calibration_samples: int = 128
    """gptq: calibration windows."""
    calibration_seq_len: int = 512
    """gptq: tokens per calibration window."""
    seed: int = 0
    """Seed of the calibration windows."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the parameters that stay float, and of the model measured before quantization."""
    output: str = "runs/quantize"
    """A folder (Hugging Face layout with quantization_config) or a file ending in .gguf."""
    eval: CompressEval = field(default_factory=CompressEval)
    """What compress.json measures before and after."""

    def validate(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 or null (per channel), found {self.group_size}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1), found {self.damp}")
        if self.calibration_samples < 1 or self.calibration_seq_len < 2:
            raise ValueError(f"calibration_samples must be >= 1 and calibration_seq_len >= 2, found "
                             f"{self.calibration_samples}, {self.calibration_seq_len}")
        if self.method == "nf4" and (self.bits != 4 or self.output.endswith(".gguf")):
            raise ValueError(f"method nf4 is 4-bit NormalFloat to a folder; found bits {self.bits}, output "
                             f"{self.output}")
        if self.output.endswith(".gguf") and self.embedding:
            raise ValueError(f"output {self.output}: embedding=true is for a folder (a .gguf keeps the embedding "
                             f"float); drop one of them")
        if self.output.endswith(".gguf") and (self.group_size != 32 or (self.bits == 8 and not self.symmetric)):
            raise ValueError(f"a .gguf output holds llama.cpp blocks of 32 weights: Q8_0 (bits 8, symmetric), Q4_0 "
                             f"(bits 4, symmetric), Q4_1 (bits 4, symmetric=false), all with group_size 32; found "
                             f"bits {self.bits}, group_size {self.group_size}, symmetric {self.symmetric}")


def main(cfg: Config) -> int:
    import time

    import torch

    from ..eval.compression import load_measured, report_saved
    from ..transforms.quant import quantize_embedding, quantize_rtn, save_quantized

    dtype = getattr(torch, cfg.dtype)
    model, tok, before = load_measured(cfg.model, dtype, cfg.eval, "quantize")
    t = time.perf_counter()
    if cfg.method == "gptq":
        from ..data.calibration import calibration_windows
        from ..transforms.gptq import gptq_quantize

        windows = calibration_windows(cfg.calibration, tok, cfg.calibration_samples, cfg.calibration_seq_len,
                                      cfg.seed)
        model = model.float()  # GPTQ's Hessian and updates in float32
        gptq_quantize(model, windows, cfg.bits, cfg.group_size, cfg.symmetric, cfg.act_order, cfg.damp)
        model = model.to(dtype)
    elif cfg.method == "nf4":
        from ..transforms.quantize import quantize_nf4

        quantize_nf4(model)
    else:
        quantize_rtn(model, cfg.bits, cfg.group_size, cfg.symmetric)
    if cfg.embedding:
        quantize_embedding(model)
    seconds = time.perf_counter() - t
    if cfg.output.endswith(".gguf"):
        from pathlib import Path

        from ..models.gguf import save_gguf

        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        out = save_gguf(model, tok, cfg.output, "f32" if cfg.dtype == "float32" else "bf16")
    else:
        out = save_quantized(model, tok, cfg.output)
    print(f"wrote {out} ({cfg.method} int{cfg.bits}, group {cfg.group_size or 'per channel'}, "
          f"{'symmetric' if cfg.symmetric else 'asymmetric'}) in {seconds:.1f} s; measuring it reloaded", flush=True)
    report_saved(out, "quantize", cfg, before, tok, cfg.eval, dtype, {"seconds": round(seconds, 1)})
    return 0
