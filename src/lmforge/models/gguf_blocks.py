"""llama.cpp's Q8_0, Q4_0 and Q4_1 blocks packed from, and unpacked to, lmforge's quantized-linear codes, bit for bit.

Ours (QuantLinear's state dict): `weight` = codes, 8-bit int8 (out, in) or 4-bit uint8 (out, in // 2) with the even
column in the low nibble; `weight_scale` fp16 (out, in // group); `weight_min` fp16 (out, in // group) when
asymmetric. llama.cpp's (ggml-common.h `block_q8_0`, `block_q4_0`, `block_q4_1`): 32 weights a block, fp16 d
[, fp16 m], then the codes; in a 4-bit block byte j holds element j in its low nibble and element j + 16 in its high
nibble. Both dequantize with the same formula (d·q, d·(q − 8), d·q + m), so packing moves bytes and never rounds.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "BLOCK_TYPES", "block_type", "block_bytes", "pack_blocks", "unpack_blocks", "pack_nibbles",
           "unpack_nibbles"]

BLOCK = 32
"""Weights per llama.cpp block (QK8_0 = QK4_0 = QK4_1 = 32): the group size our codes must have."""

BLOCK_TYPES: dict[str, tuple[int, bool]] = {"Q8_0": (8, True), "Q4_0": (4, True), "Q4_1": (4, False)}
"""GGML type name -> (bits, symmetric) of the quantize settings whose codes it stores exactly."""


def block_type(bits: int, group_size: int | None, symmetric: bool, what: str = "a layer") -> str:
    """The GGML block type ("Q8_0", "Q4_0", "Q4_1") holding codes of these quantize settings exactly; ValueError
    listing the types and the settings that produce them otherwise."""
    for name, (b, sym) in BLOCK_TYPES.items():
        if (b, sym, BLOCK) == (bits, bool(symmetric), group_size):
            return name
    kind = "symmetric" if symmetric else "asymmetric"
    group = "per channel" if group_size is None else f"group_size={group_size}"
    raise ValueError(
        f"{what} is quantized with bits={bits}, {kind}, {group}, which no GGUF block type stores "
        f"exactly; expected Q8_0 (bits=8, symmetric, group_size=32), Q4_0 (bits=4, symmetric, group_size=32) or "
        f"Q4_1 (bits=4, asymmetric, group_size=32): quantize with one of those settings")


def block_bytes(name: str) -> int:
    """Bytes of one block: fp16 d [+ fp16 m] and 32 codes of `bits` each."""
    bits, symmetric = BLOCK_TYPES[name]
    return (2 if symmetric else 4) + BLOCK * bits // 8


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """Our 4-bit packing (out, in // 2) -> codes uint8 (out, in): low nibble = even column, high = odd."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)  # (out, in)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Codes uint8 (out, in) in [0, 15] -> our 4-bit packing (out, in // 2)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _fp16_bytes(x: np.ndarray, rows: int, nb: int) -> np.ndarray:
    """fp16 values (rows, nb) as their little-endian bytes (rows, nb, 2)."""
    return np.ascontiguousarray(x, dtype="<f2").view(np.uint8).reshape(rows, nb, 2)


def pack_blocks(name: str, codes: np.ndarray, scale: np.ndarray, minimum: np.ndarray | None = None) -> np.ndarray:
    """Our codes and fp16 scales [and mins] -> llama.cpp blocks, uint8 (out, in // 32 · block_bytes(name)), the
    raw bytes `GGUFWriter.add_tensor(..., raw_dtype=...)` takes."""
    bits, symmetric = BLOCK_TYPES[name]
    rows = codes.shape[0]
    cols = codes.shape[1] * (2 if bits == 4 else 1)  # in
    nb = cols // BLOCK
    want_codes = np.dtype(np.int8 if bits == 8 else np.uint8)
    if codes.ndim != 2 or codes.dtype != want_codes or cols % BLOCK:
        raise ValueError(f"{name}: codes must be {want_codes} (out, in{' // 2' if bits == 4 else ''}) with in a "
                         f"multiple of {BLOCK}; found {codes.dtype} {tuple(codes.shape)}")
    for what, x in (("scale", scale), ("min", minimum)):
        if x is not None and tuple(x.shape) != (rows, nb):
            raise ValueError(f"{name}: {what} must have shape (out, in // {BLOCK}) = {(rows, nb)}; "
                             f"found {tuple(x.shape)}")
    if (minimum is None) != symmetric:
        raise ValueError(f"{name}: {'no min expected (symmetric)' if symmetric else 'a min is needed (asymmetric)'}; "
                         f"found {'none' if minimum is None else 'one'}")
    head = [_fp16_bytes(scale, rows, nb)] + ([] if minimum is None else [_fp16_bytes(minimum, rows, nb)])
    if bits == 8:
        qs = np.ascontiguousarray(codes).view(np.uint8).reshape(rows, nb, BLOCK)  # (out, nb, 32)
    else:
        q = unpack_nibbles(codes).reshape(rows, nb, BLOCK)  # (out, nb, 32)
        qs = q[..., :BLOCK // 2] | (q[..., BLOCK // 2:] << 4)  # (out, nb, 16): elements j and j + 16
    return np.concatenate(head + [qs.astype(np.uint8)], axis=2).reshape(rows, nb * block_bytes(name))


def unpack_blocks(name: str, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """llama.cpp blocks uint8 (out, nb · block_bytes) -> (our codes, fp16 scale (out, nb), fp16 min or None):
    the exact inverse of `pack_blocks`."""
    bits, symmetric = BLOCK_TYPES[name]
    size = block_bytes(name)
    if data.ndim != 2 or data.dtype != np.uint8 or data.shape[1] % size:
        raise ValueError(f"{name}: block data must be uint8 (rows, blocks · {size}); found {data.dtype} "
                         f"{tuple(data.shape)}")
    rows, nb = data.shape[0], data.shape[1] // size
    blocks = data.reshape(rows, nb, size)  # (out, nb, size)
    scale = np.ascontiguousarray(blocks[..., 0:2]).view("<f2").reshape(rows, nb).astype(np.float16)
    minimum = None if symmetric else np.ascontiguousarray(blocks[..., 2:4]).view("<f2").reshape(rows, nb) \
        .astype(np.float16)
    qs = blocks[..., (2 if symmetric else 4):]  # (out, nb, 32 · bits / 8)
    if bits == 8:
        return np.ascontiguousarray(qs).view(np.int8).reshape(rows, nb * BLOCK), scale, minimum
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(rows, nb * BLOCK)  # (out, in): j, then j + 16
    return pack_nibbles(q), scale, minimum
