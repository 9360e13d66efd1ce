"""Paged KV cache (Kwon et al., 2023, "Efficient Memory Management for LLM Serving with PagedAttention").

Keys and values live in a pool of fixed-size blocks preallocated per layer; each sequence owns a block table
(the list of its blocks in order), so memory is taken one block at a time and given back when the sequence
ends. Full blocks are content-addressed (a hash of all tokens up to and including the block, and the adapter),
so requests that start with the same tokens share those blocks instead of recomputing them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.transformer import ModelConfig, matmul_attention
from ..precision import NATIVE_BF16


class BlockManager:
    """Allocates blocks of `block_size` token slots from a pool of `num_blocks`, with reference counts and a
    prefix cache: a full block is registered under its chain hash and can be shared while in use; once free
    it stays findable (least recently used first out) until its slot is needed for something else."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # never cached: pop() gives 0, 1, 2, ...
        self.cached: OrderedDict[int, None] = OrderedDict()  # free but holding a registered prefix block
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}

    @property
    def available(self) -> int:
        return len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    def allocate(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.cached:
            b, _ = self.cached.popitem(last=False)  # evict the least recently used prefix block
            del self.by_hash[self.hash_of.pop(b)]
        else:
            raise RuntimeError("KV cache out of blocks")  # callers check `available` first
        self.refs[b] = 1
        return b

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.hash_of:
                    self.cached[b] = None
                else:
                    self.free.append(b)

    def lookup(self, h: int) -> int | None:
        """Take a reference to the block registered under chain hash `h`, if any."""
        b = self.by_hash.get(h)
        if b is not None:
            if self.refs[b] == 0:
                del self.cached[b]
            self.refs[b] += 1
        return b

    def register(self, b: int, h: int) -> None:
        """Record that block `b` (full) holds the tokens whose chain hash is `h`."""
        if h not in self.by_hash and b not in self.hash_of:
            self.by_hash[h], self.hash_of[b] = b, h


def chain_hashes(tokens: list[int], block_size: int, salt: object, start: int = 0, prev: int | None = None
                 ) -> list[int]:
    """Hashes of the full blocks of `tokens` from block `start`: each covers every token before it too."""
    out = []
    h = hash(("lmforge", salt)) if prev is None else prev
    for i in range(start, len(tokens) // block_size):
        h = hash((h, tuple(tokens[i * block_size:(i + 1) * block_size])))
        out.append(h)
    return out


@dataclass
class _Multi:
    """A sequence with several new tokens in this step (prefill chunk or speculative verification)."""

    start: int  # first of its tokens in the flat batch
    n: int  # new tokens
    blocks: Tensor  # (nb,) its blocks, holding its S = past + n keys
    s: int  # S
    mask: Tensor | None  # (n, S) booleans, None for plain causal over the new tokens only (no past)


class PagedKVCache:
    """Per-layer pools of keys and values laid out head-major, (K, num_blocks, block_size, D), so gathering a
    batch's blocks gives (K, B, S, D) ready for batched matmuls without a transpose; a token's slot is
    block * block_size + offset. `plan()` describes one step's flattened batch; `attend()` (the model's KVCache
    protocol) then writes the step's keys/values into their slots and attends each sequence over its own."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device, dtype: torch.dtype):
        shape = (cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.block_size, self.device = block_size, device
        self.gqa = cfg.num_heads != cfg.num_kv_heads
        self.window = cfg.sliding_window
        self.fast_cpu = torch.device(device).type == "cpu" and dtype == torch.bfloat16

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()

    def plan(self, seqs: list[tuple[list[int], int, int]]) -> None:
        """Lay out a step: `seqs` are (block table, tokens already cached, new tokens), single-token
        sequences first. Positions of new tokens follow the cached ones."""
        dev, bs = self.device, self.block_size
        new_slots: list[int] = []
        for table, c, n in seqs:
            new_slots.extend(table[p // bs] * bs + p % bs for p in range(c, c + n))
        self.slot_mapping = torch.tensor(new_slots, dtype=torch.long, device=dev)  # (N,)
        decode = [(t, c) for t, c, n in seqs if n == 1]
        self.n_decode = len(decode)
        self.decode_blocks = self.decode_mask = None
        if decode:
            nb = max(c // bs + 1 for _, c in decode)
            rows = [t[:c // bs + 1] + [t[0]] * (nb - c // bs - 1) for t, c in decode]  # padding: masked below
            self.decode_blocks = torch.tensor(rows, dtype=torch.long, device=dev).flatten()  # (Bd * nb,)
            self.decode_len = decode[0][1] + 1
            lens = torch.tensor([c + 1 for _, c in decode], device=dev)
            kpos = torch.arange(nb * bs, device=dev)
            allowed = kpos[None] < lens[:, None]  # (Bd, S)
            if self.window is not None:
                allowed &= kpos[None] > lens[:, None] - 1 - self.window
            if not bool(allowed.all()):
                self.decode_mask = allowed[None, :, None, :]  # (1, Bd, 1, S)
        self.multi: list[_Multi] = []
        start = len(decode)
        for table, c, n in seqs:
            if n == 1:
                continue
            mask = None
            if c or self.window is not None:
                qpos = torch.arange(c, c + n, device=dev)[:, None]
                kpos = torch.arange(c + n, device=dev)[None]
                mask = kpos <= qpos
                if self.window is not None:
                    mask &= qpos - kpos < self.window
            blocks = torch.tensor(table[:-(-(c + n) // bs)], dtype=torch.long, device=dev)
            self.multi.append(_Multi(start, n, blocks, c + n, mask))
            start += n

    def length(self) -> int:
        return 0  # positions come from the engine; masks from plan()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q (1, H, N, D), k/v (1, K, N, D) for the N flattened tokens of the step; returns (1, H, N, D)."""
        kp, vp = self.k[layer], self.v[layer]  # (K, NB, bs, D)
        kh, nblocks, bs, d = kp.shape
        kp.view(kh, nblocks * bs, d).index_copy_(1, self.slot_mapping, k[0].to(kp.dtype))  # (K, N, D) into slots
        vp.view(kh, nblocks * bs, d).index_copy_(1, self.slot_mapping, v[0].to(vp.dtype))
        out = []
        if self.n_decode:
            out.append(self._decode(q[0, :, :self.n_decode], kp, vp))  # (H, Bd, D)
        for m in self.multi:
            qm = q[:, :, m.start:m.start + m.n]  # (1, H, n, D)
            if m.s == m.n:  # nothing cached before: attend over this step's own keys
                keys, vals = k[:, :, m.start:m.start + m.n], v[:, :, m.start:m.start + m.n]
            else:
                keys = kp.index_select(1, m.blocks).view(kh, -1, d)[None, :, :m.s].to(qm.dtype)  # (1, K, S, D)
                vals = vp.index_select(1, m.blocks).view(kh, -1, d)[None, :, :m.s].to(qm.dtype)
            if self.fast_cpu and not NATIVE_BF16:  # bf16 matmuls are widened in-kernel: widen once instead
                y = matmul_attention(qm.float(), keys.float(), vals.float(), m.mask, is_causal=True).to(qm.dtype)
            elif self.fast_cpu:
                y = matmul_attention(qm, keys, vals, m.mask, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(qm, keys, vals, attn_mask=m.mask, is_causal=m.mask is None,
                                                   enable_gqa=self.gqa)
            out.append(y[0])  # (H, n, D)
        return torch.cat(out, dim=1)[None] if len(out) > 1 else out[0][None]  # (1, H, N, D)

    def _decode(self, q: Tensor, kp: Tensor, vp: Tensor) -> Tensor:
        """One query per sequence, q (H, Bd, D), over its gathered blocks: two batched matmuls with the G = H / K
        query heads of a key head side by side (no repeated keys), softmax in fp32. Returns (H, Bd, D)."""
        h, bd, d = q.shape
        kh = kp.shape[0]
        keys = kp.index_select(1, self.decode_blocks).view(kh, bd, -1, d)  # (K, Bd, S, D)
        vals = vp.index_select(1, self.decode_blocks).view(kh, bd, -1, d)
        qg = q.reshape(kh, h // kh, bd, d).transpose(1, 2).to(keys.dtype)  # (K, Bd, G, D)
        if bd == 1 and self.window is None:  # one sequence: cut the keys at its length instead of masking
            keys, vals = keys[:, :, :self.decode_len], vals[:, :, :self.decode_len]
        scores = (qg * d ** -0.5) @ keys.transpose(-1, -2)  # (K, Bd, G, S)
        if self.decode_mask is not None and not (bd == 1 and self.window is None):
            scores = scores.masked_fill(~self.decode_mask, float("-inf"))  # mask (1, Bd, 1, S)
        y = torch.softmax(scores, -1, dtype=torch.float32).to(vals.dtype) @ vals  # (K, Bd, G, D)
        return y.transpose(1, 2).reshape(h, bd, d).to(q.dtype)  # (H, Bd, D)
