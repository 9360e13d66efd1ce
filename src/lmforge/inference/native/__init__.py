"""The native decode step (decode.cpp): every layer of one decode (or draft-verification) step in one C++ call,
weights read in their stored precision (float32, bfloat16, int8, int4 codes with group scales). Built once per
machine with `torch.utils.cpp_extension` into a cache folder keyed by the source and the compiler flags; where it
cannot build (no compiler, no AVX-512, LMFORGE_NATIVE=0) the engine runs the PyTorch path and says why
(`Engine.decode_path`, the server's /metrics and `lmforge serve`'s start line).

A `NativeDecoder` holds no copy of the weights: its compiled `Decoder` holds the model's own parameters (taken
once, when it is built) and reads them at every step, so a model updated in place between steps (RL rollouts, an
optimizer step, a `load_state_dict`) decodes with its current weights. A layer replaced by another module needs a
new engine.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

SOURCE = Path(__file__).with_name("decode.cpp")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-fopenmp"]
_state: dict[str, object] = {}


def cache_dir() -> Path:
    base = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + [torch.__version__]).encode()).hexdigest()[:16]
    return base / "native" / key


def load():
    """The compiled extension, or None (then `why_not()` says why); built on first use (about a minute)."""
    if "module" not in _state:
        _state["module"], _state["why"] = None, ""
        if os.environ.get("LMFORGE_NATIVE", "1") == "0":
            _state["why"] = "LMFORGE_NATIVE=0"
        elif torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
            _state["why"] = f"CPU capability {torch.backends.cpu.get_cpu_capability()}, AVX-512 needed"
        else:
            try:
                from torch.utils.cpp_extension import load as build

                folder = cache_dir()
                folder.mkdir(parents=True, exist_ok=True)
                _state["module"] = build("lmforge_decode", [str(SOURCE)], extra_cflags=FLAGS,
                                         build_directory=str(folder), verbose=False)
            except Exception as e:  # no compiler, headers or ninja: the PyTorch path serves
                _state["why"] = f"build failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    return _state["module"]


def why_not() -> str:
    load()
    return str(_state["why"])


def _linear_parts(m: nn.Module) -> list[Tensor] | None:
    """(weight or codes, scale, min, bias) of a plain or integer-quantized linear layer; None for any other."""
    from ...transforms.quant import QuantLinear

    empty = torch.empty(0)
    bias = m.bias if getattr(m, "bias", None) is not None else empty
    if type(m) is nn.Linear and m.weight.dtype in (torch.float32, torch.bfloat16) and type(m.weight.data) is Tensor:
        return [m.weight, empty, empty, bias]
    if type(m) is QuantLinear:
        mn = m.weight_min if m.weight_min is not None else empty
        return [m.weight, m.weight_scale, mn, bias]
    return None


class NativeDecoder:
    """Runs decode steps (a row per new token, a few per sequence when verifying drafts) of a supported model
    through the native step. Construct with `NativeDecoder.build(model)`, which returns (decoder, None) or (None,
    the reason it does not apply)."""

    def __init__(self, model: nn.Module, module):
        self.model, self.module = model, module
        cfg = model.cfg
        dims = [cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.sliding_window or 0,
                int(model.embed.tokens.weight.dtype == torch.bfloat16)]
        self._head: tuple[int, list[Tensor]] | None = None
        self.decoder = module.Decoder(self._block_weights(), dims, cfg.norm_eps)

    @classmethod
    def build(cls, model: nn.Module) -> tuple["NativeDecoder | None", str | None]:
        cfg = getattr(model, "cfg", None)
        if cfg is None or model.device.type != "cpu":
            return None, "not a CPU model"
        shape = dict(causal=cfg.causal, position=cfg.position, norm=cfg.norm, norm_position=cfg.norm_position,
                     mlp=cfg.mlp, activation=cfg.activation, head=cfg.head, final_norm=cfg.final_norm,
                     embed_norm=cfg.embed_norm, type_vocab_size=cfg.type_vocab_size)
        want = dict(causal=True, position="rope", norm="rmsnorm", norm_position="pre", mlp="gated",
                    activation="silu", head="lm", final_norm=True, embed_norm=False, type_vocab_size=0)
        off = [f"{k}={shape[k]!r}" for k in want if shape[k] != want[k]]
        if off:
            return None, f"architecture not covered ({', '.join(off)})"
        if any(n % 16 for n in (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size)):
            return None, "hidden, head and MLP widths must be multiples of 16"
        if getattr(model, "prompt", None) is not None:
            return None, "prompt-tuned model"
        if model.embed.tokens.weight.dtype not in (torch.float32, torch.bfloat16):
            return None, f"embedding dtype {model.embed.tokens.weight.dtype}"
        for b in model.blocks:
            for m in (b.attn.q, b.attn.k, b.attn.v, b.attn.o, b.mlp.gate, b.mlp.up, b.mlp.down):
                if _linear_parts(m) is None:
                    return None, f"layer {type(m).__name__} (adapters and other wrapped layers run in PyTorch)"
        module = load()
        if module is None:
            return None, why_not()
        return cls(model, module), None

    def head(self) -> list[Tensor]:
        """The output projection's parts. A tied embedding stored as int8 (`quantize --embedding`) holds exactly
        the dequantized codes, so the head reads the same codes again (a quarter of the float32 bytes)."""
        m = self.model
        if not m.cfg.tie_embeddings:
            return _linear_parts(m.lm_head)
        w = m.embed.tokens.weight
        if not getattr(m.embed.tokens, "stored_int8", False):
            return [w.detach(), torch.empty(0), torch.empty(0), torch.empty(0)]
        if self._head is None or self._head[0] != w._version:
            from ...transforms.quant import quantize_weight

            codes, scale, _ = quantize_weight(w, 8, None, True)
            self._head = (w._version, [codes, scale, torch.empty(0), torch.empty(0)])
        return self._head[1]

    def _block_weights(self) -> list[Tensor]:
        """Every tensor of a step but the head's, in decode.cpp's order: per layer 30, then the final norm."""
        out: list[Tensor] = []
        for b in self.model.blocks:
            out.append(b.attn_norm.weight)
            for m in (b.attn.q, b.attn.k, b.attn.v, b.attn.o):
                out += _linear_parts(m)
            out.append(b.mlp_norm.weight)
            for m in (b.mlp.gate, b.mlp.up, b.mlp.down):
                out += _linear_parts(m)
        return out + [self.model.norm.weight]

    @torch.no_grad()
    def __call__(self, ids: list[int], pos: list[int], tables: list[list[int]], k: list[Tensor], v: list[Tensor],
                 block_size: int) -> Tensor:
        """Logits (B, V) float32 of B rows: token ids[b] at position pos[b] of the sequence whose block table is
        tables[b]; writes their keys and values into the pools k, v (per layer (K, NB, bs, D)) before any row
        attends, each row up to its own position."""
        nb = max(p // block_size + 1 for p in pos)
        rows = [t[:nb] + [t[0]] * (nb - len(t[:nb])) for t in tables]  # padding past a sequence is never read
        p = torch.tensor(pos)
        x = self.model.embed(torch.tensor(ids)[None], p[None], None)[0]  # (B, C)
        return self.decoder.step(x, p, torch.tensor(rows), k, v, self.head(), self.model.inv_freq)
