"""`lmforge convert SRC DST`: any model lmforge reads (HF folder, GGUF, hub id) to a Hugging Face folder, or to a
GGUF file when DST ends in .gguf."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

POSITIONAL = ("src", "dst")


@dataclass
class Config:
    src: str
    """Source model: a Hugging Face folder, a .gguf file, a hub id or a local alias."""
    dst: str
    """Destination: a folder (Hugging Face layout) or a file ending in .gguf (llama architecture)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Weight dtype to write; default keeps the source's (GGUF dequantizes to float32)."""
    max_shard_gb: float = 2.0
    """Split the weights into safetensors shards of at most this many GB."""
    allow_pickle: bool = False
    """Allow reading pickle (.bin/.pt) checkpoints; only for files you trust."""

    def validate(self) -> None:
        if self.max_shard_gb <= 0:
            raise ValueError(f"max_shard_gb must be > 0, found {self.max_shard_gb}")


def main(cfg: Config) -> int:
    import torch

    from ..models.loading import save
    from ..transforms.peft import load

    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    model, tok = load(cfg.src, dtype=dtype, allow_pickle=cfg.allow_pickle)
    if cfg.dst.endswith(".gguf"):
        from ..models.gguf import save_gguf

        if tok is None:
            raise ValueError(f"{cfg.src} has no tokenizer; a GGUF file must carry one")
        kind = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(next(model.parameters()).dtype, "f32")
        out = save_gguf(model, tok, cfg.dst, kind)
    else:
        out = save(model, tok, cfg.dst, max_shard_bytes=int(cfg.max_shard_gb * 1024**3))
    n = model.num_parameters()
    print(f"wrote {out} ({model.cfg.family}, head {model.cfg.head}, {n / 1e6:.1f}M parameters)")
    return 0
