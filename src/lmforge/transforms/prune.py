"""Pruning of a Transformer's block linears to exact zeros: magnitude, Wanda (Sun et al. 2023, "A Simple and
Effective Pruning Approach for Large Language Models") and SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot", Alg. 1), unstructured or N:M semi-structured (2:4).

A pruned model stays a normal float model: the chosen `nn.Linear`s of `blocks.*` (attention q/k/v/o, MLP
gate/up/down) hold exact zeros, embeddings, norms and the LM head are untouched, and lmforge's ordinary save and
load keep the zeros. `pruning_config` is the record a stage writes into config.json as `"pruning_config"`.

Targets: `sparsity` p zeroes round(p·n) weights of each comparison group of n weights; `pattern` (N, M) keeps the N
largest-scoring weights of every M consecutive inputs of a row (M − N zeros each, the layout sparse tensor cores
run at 2:4). Comparison groups of the unstructured scores: each output row (`scope="row"`, Wanda's choice, its §3)
or the whole matrix (`scope="layer"`, the classic magnitude baseline of both papers). SparseGPT picks its mask
per block of `blocksize` columns over all rows (adaptive mask selection, its §3.2), or per M columns for N:M.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .calibrate import calibrate_sequential
from .gptq import HessianAccumulator, inverse_hessian_factor
from .quant import ModuleFilter, block_linears

__all__ = ["PruneConfig", "prune", "prune_magnitude", "prune_wanda", "prune_sparsegpt", "prune_mask",
           "sparsegpt_weight", "parse_pattern", "sparsity_report", "pruning_config", "WandaObserver",
           "SparseGPTObserver", "METHODS", "SCOPES"]

METHODS = ("magnitude", "wanda", "sparsegpt")
"""The pruning methods by name."""
SCOPES = ("row", "layer")
"""Comparison groups of unstructured magnitude and Wanda scores: each output row, or the whole matrix."""
DEFAULT_SPARSITY = 0.5
Pattern = tuple[int, int] | Sequence[int] | str | None


def parse_pattern(pattern: Pattern) -> tuple[int, int] | None:
    """(N, M) from "N:M" or (N, M); None stays None. ValueError unless 1 <= N < M."""
    if pattern is None:
        return None
    parts: Any = pattern.split(":") if isinstance(pattern, str) else pattern
    try:
        ok = len(parts) == 2 and all(p.strip().isdigit() if isinstance(p, str) else
                                     isinstance(p, int) and not isinstance(p, bool) for p in parts)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"pattern is {pattern!r}, expected N:M such as '2:4' or (2, 4)")
    n, m = (int(p) for p in parts)
    if not 1 <= n < m:
        raise ValueError(f"pattern {n}:{m} keeps N={n} of every M={m} weights; expected 1 <= N < M (e.g. 2:4)")
    return n, m


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity is {sparsity!r}, expected a fraction of zero weights in [0, 1)")
    return float(sparsity)


@dataclass
class PruneConfig:
    """Settings of pruning."""

    method: str = "wanda"
    """Pruning method: magnitude (|W|), wanda (|W|·‖X‖, calibrated) or sparsegpt (OBS mask and update, calibrated)."""
    sparsity: float | None = None
    """Fraction of each comparison group's weights set to zero, in [0, 1); default 0.5 when no pattern is given."""
    pattern: str | None = None
    """N:M semi-structured sparsity instead of `sparsity`, e.g. "2:4": in every M consecutive inputs keep N."""
    scope: str | None = None
    """Unstructured magnitude / Wanda: compare within each output row (row) or the whole matrix (layer); default
    layer for magnitude, row for Wanda (as their papers)."""
    blocksize: int = 128
    """SparseGPT: columns per mask selection and lazy update (a multiple of M for N:M)."""
    damp: float = 0.01
    """SparseGPT: dampening added to the Hessian diagonal, as a fraction of its mean."""
    true_sequential: bool = True
    """Calibrated methods: q/k/v, then o, then gate/up, then down, each on inputs of the already pruned layers."""
    batch_size: int = 8
    """Calibration sequences per forward."""

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method is {self.method!r}, expected one of {METHODS}")
        if self.sparsity is not None and self.pattern is not None:
            raise ValueError(f"both sparsity ({self.sparsity}) and pattern ({self.pattern!r}) given; expected one")
        if self.sparsity is not None:
            _check_sparsity(self.sparsity)
        nm = parse_pattern(self.pattern)
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"scope is {self.scope!r}, expected one of {SCOPES}")
        for name in ("blocksize", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} is {v!r}, expected a positive integer")
        if nm and self.method == "sparsegpt" and self.blocksize % nm[1]:
            raise ValueError(f"blocksize {self.blocksize} is not a multiple of M={nm[1]} of pattern {self.pattern}; "
                             f"expected e.g. {nm[1] * max(1, self.blocksize // nm[1])}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp is {self.damp}, expected a fraction of the mean Hessian diagonal in [0, 1)")

    def target(self) -> tuple[float, tuple[int, int] | None]:
        """(sparsity, (N, M) or None): the sparsity N:M implies, 1 − N/M, when a pattern is set."""
        nm = parse_pattern(self.pattern)
        if nm:
            return 1 - nm[0] / nm[1], nm
        return (DEFAULT_SPARSITY if self.sparsity is None else float(self.sparsity)), None

    def group_scope(self) -> str:
        """The unstructured comparison group in effect (SparseGPT: its blocks, reported as "block")."""
        if self.method == "sparsegpt":
            return "block"
        return self.scope or ("layer" if self.method == "magnitude" else "row")


def _pattern_str(pattern: Pattern) -> str | None:
    nm = parse_pattern(pattern)
    return None if nm is None else f"{nm[0]}:{nm[1]}"


@torch.no_grad()
def prune_mask(scores: Tensor, sparsity: float = DEFAULT_SPARSITY, pattern: Pattern = None,
               scope: str = "row") -> Tensor:
    """The keep-mask (out, in) bool of importance `scores` (out, in): False on the round(p·n) lowest scores of each
    row (scope row) or of the whole matrix (scope layer), or on the M − N lowest of every M consecutive inputs of a
    row (pattern N:M, which overrides sparsity and scope). Ties are broken by position, so counts are exact."""
    out, n = scores.shape
    keep = torch.ones(out, n, dtype=torch.bool, device=scores.device)
    nm = parse_pattern(pattern)
    if nm:
        if n % nm[1]:
            raise ValueError(f"pattern {nm[0]}:{nm[1]} needs M={nm[1]} to divide in_features, found {n}")
        s = scores.reshape(out, n // nm[1], nm[1])  # (out, groups, M)
        low = s.argsort(dim=-1, stable=True)[..., :nm[1] - nm[0]]  # (out, groups, M − N)
        return keep.reshape_as(s).scatter_(-1, low, False).reshape(out, n)
    if scope not in SCOPES:
        raise ValueError(f"scope is {scope!r}, expected one of {SCOPES}")
    p = _check_sparsity(sparsity)
    flat = scores.reshape(1, -1) if scope == "layer" else scores  # (1, out·in) or (out, in)
    k = round(p * flat.shape[1])
    low = flat.argsort(dim=-1, stable=True)[:, :k]
    return keep.reshape_as(flat).scatter_(-1, low, False).reshape(out, n)


@torch.no_grad()
def sparsegpt_weight(w: Tensor, h: Tensor, sparsity: float = DEFAULT_SPARSITY, pattern: Pattern = None,
                     blocksize: int = 128, damp: float = 0.01) -> Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1) of one weight w (out, in) given the Hessian h = 2XᵀX/n (in, in):
    the pruned weight (out, in) float32 with exact zeros. Columns are visited in order; at the start of each block
    of `blocksize` columns the round(p·out·b) weights of lowest w²/[U]_jj² over the block (U the upper Cholesky
    factor of H⁻¹; for N:M, the M − N lowest of each row at the start of every M columns) are chosen, and each
    pruned weight's error is pushed onto the row's later columns by the OBS update, lazily across blocks."""
    W = w.detach().float().clone()  # (out, in)
    out, n = W.shape
    if h.shape != (n, n):
        raise ValueError(f"Hessian has shape {tuple(h.shape)}, expected ({n}, {n}) for a weight with {n} inputs")
    nm = parse_pattern(pattern)
    p = 1 - nm[0] / nm[1] if nm else _check_sparsity(sparsity)
    if nm and (n % nm[1] or blocksize % nm[1]):
        raise ValueError(f"pattern {nm[0]}:{nm[1]} needs M={nm[1]} to divide in_features ({n}) and blocksize "
                         f"({blocksize})")
    U, dead = inverse_hessian_factor(h, damp)  # (in, in), (in,)
    W[:, dead] = 0
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()  # (out, b): this block, updated at once
        Err1 = torch.zeros_like(W1)  # (out, b): scaled errors, applied to later blocks lazily
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()  # (b,)
        if nm is None:  # adaptive mask selection: the block's lowest OBS saliencies over all rows
            pruned = ~prune_mask(W1.pow(2) / d.pow(2), p, scope="layer")  # (out, b)
        else:
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm and i % nm[1] == 0:  # N:M: choose in the next M columns as updated so far
                j = slice(i, i + nm[1])
                pruned[:, j] = ~prune_mask(W1[:, j].pow(2) / d[j].pow(2), pattern=nm)
            err = torch.where(pruned[:, i], W1[:, i], 0) / d[i]  # (out,): (w − ŵ) / U_ii, ŵ = 0 where pruned
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # OBS update of the block's remaining columns
            Err1[:, i] = err
        W[:, i1:i2] = W1.masked_fill(pruned, 0)  # exact zeros (w − err·U_ii leaves rounding dust)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of the later columns
    return W


class WandaObserver:
    """Accumulates ‖X_j‖₂² of each input column over the calibration rows; `finish` zeroes the weights of lowest
    |W_ij|·‖X_j‖₂ (Wanda, Sun et al. 2023, eq. 1) in place."""

    def __init__(self, linear: nn.Linear, sparsity: float, pattern: Pattern, scope: str):
        self.linear, self.sparsity, self.pattern, self.scope = linear, sparsity, pattern, scope
        self.sq = torch.zeros(linear.in_features, dtype=torch.float64, device=linear.weight.device)  # (in,)

    def add(self, x: Tensor) -> None:
        self.sq += x.pow(2).sum(0, dtype=torch.float64)  # x (N, in) -> (in,)

    def finish(self) -> None:
        w = self.linear.weight  # (out, in)
        scores = w.detach().float().abs() * self.sq.sqrt().float()[None, :]  # (out, in)
        w.mul_(prune_mask(scores, self.sparsity, self.pattern, self.scope).to(w.dtype))


class SparseGPTObserver(HessianAccumulator):
    """Accumulates H = 2XᵀX/n (as GPTQ does) and `finish` writes the SparseGPT-pruned weight into the layer in
    place."""

    def __init__(self, linear: nn.Linear, cfg: PruneConfig, shared: dict):
        super().__init__(linear, shared)
        self.linear, self.cfg = linear, cfg

    def finish(self) -> None:
        sparsity, nm = self.cfg.target()
        w = self.linear.weight
        w.copy_(sparsegpt_weight(w, self.hessian(), sparsity, nm, self.cfg.blocksize, self.cfg.damp).to(w.dtype))


def _check_layers(layers: list[tuple[str, nn.Linear]], nm: tuple[int, int] | None) -> None:
    if not layers:
        raise ValueError("no float linear layer inside blocks.* selected for pruning; expected names like "
                         "'attn.q', 'mlp.down' or None for all")
    if nm:
        bad = [(name, lin.in_features) for name, lin in layers if lin.in_features % nm[1]]
        if bad:
            raise ValueError(f"pattern {nm[0]}:{nm[1]} needs M={nm[1]} to divide in_features; found {bad[0][1]} in "
                             f"{bad[0][0]}" + (f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""))


@torch.no_grad()
def prune(model: nn.Module, cfg: PruneConfig, calibration: Tensor | Sequence[Tensor] | None = None, *,
          modules: ModuleFilter = None, progress: bool = True) -> nn.Module:
    """Prune the selected block linears (default all) of `model` in place by `cfg`; Wanda and SparseGPT calibrate
    layer-sequentially on `calibration` token ids ((n, T) or a list of (1, T)), so each layer sees the inputs the
    already pruned layers produce. Returns the model."""
    cfg.validate()
    sparsity, nm = cfg.target()
    layers = block_linears(model, modules)
    _check_layers(layers, nm)
    if cfg.method == "magnitude":
        for _, lin in layers:
            w = lin.weight  # (out, in)
            w.mul_(prune_mask(w.detach().float().abs(), sparsity, nm, cfg.group_scope()).to(w.dtype))
        return model
    if calibration is None:
        raise ValueError(f"method {cfg.method} needs calibration token ids ((n, T) or a list of (1, T)); found none")
    shared: dict = {}

    def observer(_name: str, lin: nn.Linear) -> WandaObserver | SparseGPTObserver:
        if cfg.method == "wanda":
            return WandaObserver(lin, sparsity, nm, cfg.group_scope())
        return SparseGPTObserver(lin, cfg, shared)

    return calibrate_sequential(model, calibration, observer, modules=modules, true_sequential=cfg.true_sequential,
                                batch_size=cfg.batch_size, progress=progress, description=cfg.method)


def prune_magnitude(model: nn.Module, sparsity: float | None = None, pattern: Pattern = None, *,
                    scope: str = "layer", modules: ModuleFilter = None) -> nn.Module:
    """Magnitude pruning: zero the weights of lowest |W| in each layer (scope layer, the classic baseline) or in
    each output row (scope row), or the M − N lowest of every M inputs (pattern N:M). In place; returns the model."""
    return prune(model, PruneConfig("magnitude", sparsity, _pattern_str(pattern), scope), modules=modules)


def prune_wanda(model: nn.Module, calibration: Tensor | Sequence[Tensor], sparsity: float | None = None,
                pattern: Pattern = None, *, scope: str = "row", modules: ModuleFilter = None,
                true_sequential: bool = True, batch_size: int = 8, progress: bool = True) -> nn.Module:
    """Wanda (Sun et al. 2023): zero the weights of lowest |W_ij|·‖X_j‖₂ per output row (or per layer, or per M
    inputs for N:M), with ‖X_j‖ over the calibration inputs of the layer. In place; returns the model."""
    cfg = PruneConfig("wanda", sparsity, _pattern_str(pattern), scope, true_sequential=true_sequential,
                      batch_size=batch_size)
    return prune(model, cfg, calibration, modules=modules, progress=progress)


def prune_sparsegpt(model: nn.Module, calibration: Tensor | Sequence[Tensor], sparsity: float | None = None,
                    pattern: Pattern = None, blocksize: int = 128, damp: float = 0.01, *,
                    modules: ModuleFilter = None, true_sequential: bool = True, batch_size: int = 8,
                    progress: bool = True) -> nn.Module:
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1) on the damped Hessian of each layer's calibration inputs: OBS
    mask selection per block (or per M columns) and the error-compensating update. In place; returns the model."""
    cfg = PruneConfig("sparsegpt", sparsity, _pattern_str(pattern), None, blocksize, damp, true_sequential,
                      batch_size)
    return prune(model, cfg, calibration, modules=modules, progress=progress)


@torch.no_grad()
def sparsity_report(model: nn.Module, pattern: Pattern = None) -> dict[str, Any]:
    """Zeros / weights of every linear in `blocks.*` (float, or quantized with `dequantize()`) and in total; with a
    pattern N:M, also whether every group of M consecutive inputs of each row holds at least M − N zeros
    (`pattern_ok`; False where M does not divide the layer's inputs). Embeddings, norms and the head are not
    counted."""
    nm = parse_pattern(pattern)
    layers: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if not name.startswith("blocks.") or not (type(m) is nn.Linear or callable(getattr(m, "dequantize", None))):
            continue
        w = m.weight.detach() if type(m) is nn.Linear else m.dequantize()  # (out, in)
        zero = w == 0
        row: dict[str, Any] = {"zeros": int(zero.sum()), "weights": w.numel()}
        row["sparsity"] = row["zeros"] / row["weights"]
        if nm:
            out, n = w.shape
            row["pattern_ok"] = n % nm[1] == 0 and bool(
                (zero.reshape(out, -1, nm[1]).sum(-1) >= nm[1] - nm[0]).all())
        layers[name] = row
    zeros, weights = sum(r["zeros"] for r in layers.values()), sum(r["weights"] for r in layers.values())
    report: dict[str, Any] = {"zeros": zeros, "weights": weights, "sparsity": zeros / max(weights, 1),
                              "layers": layers}
    if nm:
        report["pattern"] = f"{nm[0]}:{nm[1]}"
        report["pattern_ok"] = bool(layers) and all(r["pattern_ok"] for r in layers.values())
    return report


def pruning_config(model: nn.Module, cfg: PruneConfig, modules: ModuleFilter = None,
                   **extra: Any) -> dict[str, Any]:
    """The `"pruning_config"` record of config.json: method, the target (sparsity, or pattern "N:M"), the
    comparison scope, SparseGPT's blocksize and damp, the pruned layers' names, and `extra` JSON values (e.g. the
    calibration size)."""
    cfg.validate()
    sparsity, nm = cfg.target()
    rec: dict[str, Any] = {"method": cfg.method}
    rec.update({"pattern": f"{nm[0]}:{nm[1]}"} if nm else {"sparsity": sparsity, "scope": cfg.group_scope()})
    if cfg.method == "sparsegpt":
        rec.update(blocksize=cfg.blocksize, damp=cfg.damp)
    rec["modules"] = [n for n, _ in block_linears(model, modules)]
    rec.update(extra)
    return rec
