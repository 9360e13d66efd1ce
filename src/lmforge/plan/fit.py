"""Scaling-law fits: L(N, D) = E + A / N^α + B / D^β from the final losses of a grid of runs (Hoffmann et al. 2022,
"Chinchilla", approach 3), its bootstrap confidence intervals, and the compute-optimal frontier it implies under
C = 6·N·D (Kaplan et al. 2020 for the power-law form and 6ND).

The fit follows the paper's recipe: parametrise log L̂ = LSE(a − α·log N, b − β·log D, e) with A = eᵃ, B = eᵇ, E = eᵉ
(positive by construction), minimise Σ Huber_δ(log L̂ − log L) with L-BFGS-B from a grid of initialisations and
keep the best. Confidence intervals resample the points with replacement and refit (percentile bootstrap).
Floor 2: numpy here, scipy imported where it is used (`pip install 'lmforge[scale]'`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["DEFAULT_INITS", "Frontier", "LawFit", "compute_optimal", "fit_law", "interval", "law_from_dict", "predict",
           "require_scipy"]

PARAMS = ("E", "A", "B", "alpha", "beta")

DEFAULT_INITS: dict[str, tuple[float, ...]] = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
"""Hoffmann et al.'s grid of initialisations (their §D.2): every combination is scored, the best few optimised."""


@dataclass
class LawFit:
    """A fitted L(N, D) = E + A/N^α + B/D^β, with percentile bootstrap intervals (`ci[name] = (low, high)`)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    loss: float = 0.0
    """The minimised Σ Huber_δ(log L̂ − log L) (over the points used)."""
    points: int = 0
    """How many (N, D, L) points were fitted."""
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Confidence interval of each parameter (and of the frontier exponents a, b) from the bootstrap."""
    confidence: float = 0.95
    """Coverage of `ci`."""
    bootstrap: int = 0
    """Bootstrap refits behind `ci` (0: none)."""
    rms_log_error: float = 0.0
    """Root mean square of log L̂ − log L over the fitted points (a relative error)."""
    samples: list[list[float]] = field(default_factory=list)
    """The bootstrap refits as rows (E, A, B, α, β): intervals of anything derived from the law (`interval`)."""

    @property
    def exponents(self) -> tuple[float, float]:
        """(a, b) of the frontier N_opt ∝ C^a, D_opt ∝ C^b: a = β/(α+β), b = α/(α+β) (Hoffmann et al. eq. 4)."""
        s = self.alpha + self.beta
        return (self.beta / s, self.alpha / s) if s > 0 else (math.nan, math.nan)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"] = {k: list(v) for k, v in self.ci.items()}
        out["frontier_exponents"] = list(self.exponents)
        return out


def law_from_dict(d: dict[str, Any]) -> LawFit:
    """A LawFit back from `to_dict()` (scale.json's "fit"); ValueError naming what is missing."""
    missing = [k for k in PARAMS if not isinstance(d.get(k), (int, float))]
    if missing:
        raise ValueError(f"a fitted law needs numbers {', '.join(PARAMS)}; missing or not numeric: "
                         f"{', '.join(missing)}")
    return LawFit(**{k: float(d[k]) for k in PARAMS}, loss=float(d.get("loss", 0.0)), points=int(d.get("points", 0)),
                  ci={k: (float(v[0]), float(v[1])) for k, v in (d.get("ci") or {}).items()},
                  confidence=float(d.get("confidence", 0.95)), bootstrap=int(d.get("bootstrap", 0)),
                  rms_log_error=float(d.get("rms_log_error", 0.0)), samples=[list(r) for r in d.get("samples") or []])


def predict(fit: LawFit, n: Any, d: Any) -> Any:
    """L̂(N, D) = E + A/N^α + B/D^β (scalars or arrays)."""
    n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
    out = fit.E + fit.A / n ** fit.alpha + fit.B / d ** fit.beta
    return float(out) if out.ndim == 0 else out


def interval(fit: LawFit, n: float, d: float) -> tuple[float, float]:
    """The bootstrap interval (level `fit.confidence`) of L̂(N, D): the percentiles of each refit's prediction;
    (nan, nan) without bootstrap samples."""
    if not fit.samples:
        return math.nan, math.nan
    s = np.asarray(fit.samples, dtype=float)
    values = s[:, 0] + s[:, 1] / float(n) ** s[:, 3] + s[:, 2] / float(d) ** s[:, 4]
    lo, hi = 50 * (1 - fit.confidence), 50 * (1 + fit.confidence)
    return float(np.percentile(values, lo)), float(np.percentile(values, hi))


@dataclass
class Frontier:
    """The compute-optimal allocation of a budget C = 6·N·D under a fitted law."""

    flops: float
    params: float
    tokens: float
    loss: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def compute_optimal(fit: LawFit, flops: float) -> Frontier:
    """N_opt = G·(C/6)^(β/(α+β)), D_opt = G⁻¹·(C/6)^(α/(α+β)), G = (αA/(βB))^(1/(α+β)) (Hoffmann et al. eq. 4):
    the (N, D) minimising L̂ on the line 6·N·D = C."""
    if not flops > 0:
        raise ValueError(f"flops: expected a positive FLOP budget, found {flops}")
    if not (fit.alpha > 0 and fit.beta > 0):
        raise ValueError(f"the law has no compute-optimal frontier with alpha {fit.alpha:.3g}, beta {fit.beta:.3g}; "
                         "expected both > 0")
    s = fit.alpha + fit.beta
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / s)
    n = g * (flops / 6.0) ** (fit.beta / s)
    d = (flops / 6.0) ** (fit.alpha / s) / g
    return Frontier(float(flops), float(n), float(d), float(predict(fit, n, d)))


# ---- the objective


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber_δ(r) and its derivative, elementwise."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return value, grad


def _objective(theta: np.ndarray, logn: np.ndarray, logd: np.ndarray, logl: np.ndarray, w: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Σ w·Huber_δ(LSE(a − α·log N, b − β·log D, e) − log L) / δ² and its gradient in θ = (a, b, e, α, β)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * logn, b - beta * logd, np.full_like(logn, e)])  # (3, points)
    top = terms.max(axis=0)
    ex = np.exp(terms - top)
    lse = top + np.log(ex.sum(axis=0))
    soft = ex / ex.sum(axis=0)  # ∂LSE/∂term, (3, points)
    value, dh = _huber(lse - logl, delta)
    g = w * dh / delta ** 2  # in units of δ²: L-BFGS-B's tolerances then mean the same for any δ
    grad = np.array([(g * soft[0]).sum(), (g * soft[1]).sum(), (g * soft[2]).sum(),
                     -(g * soft[0] * logn).sum(), -(g * soft[1] * logd).sum()])
    return float((w * value).sum()) / delta ** 2, grad


def _grid(inits: dict[str, Sequence[float]]) -> np.ndarray:
    """Every combination of the initial values as rows θ = (a, b, e, α, β)."""
    missing = [k for k in ("a", "b", "e", "alpha", "beta") if not inits.get(k)]
    if missing:
        raise ValueError(f"inits: expected values for a, b, e, alpha and beta; missing {', '.join(missing)}")
    return np.array(list(itertools.product(inits["a"], inits["b"], inits["e"], inits["alpha"], inits["beta"])),
                    dtype=float)


def _score_grid(grid: np.ndarray, logn, logd, logl, w, delta: float) -> np.ndarray:
    """The objective at every row of `grid`, vectorised (no gradient)."""
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * logn, b - beta * logd, np.broadcast_to(e, (len(grid), len(logn)))])
    top = terms.max(axis=0)
    lse = top + np.log(np.exp(terms - top).sum(axis=0))
    return (w * _huber(lse - logl, delta)[0]).sum(axis=1)


def require_scipy() -> None:
    """ImportError with the extra to install when scipy is missing (`lmforge scale` checks before training)."""
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        raise ImportError("scaling-law fits need scipy: pip install 'lmforge[scale]'") from None


def _minimise(starts: np.ndarray, logn, logd, logl, w, delta: float) -> tuple[np.ndarray, float]:
    """L-BFGS-B from each start; the best (θ, objective). Exponents are kept in [0, 5] (a negative one has no
    meaning here and lets the two terms trade places)."""
    require_scipy()
    from scipy.optimize import minimize

    bounds = [(None, None), (None, None), (None, None), (0.0, 5.0), (0.0, 5.0)]
    best, best_value = starts[0], math.inf
    for x0 in starts:
        res = minimize(_objective, x0, args=(logn, logd, logl, w, delta), jac=True, method="L-BFGS-B",
                       bounds=bounds, options={"maxiter": 1000, "ftol": 1e-10, "gtol": 1e-5})
        if np.isfinite(res.fun) and res.fun < best_value:
            best, best_value = res.x, float(res.fun)
    return np.asarray(best, dtype=float), best_value * delta ** 2


def _check_points(n: Any, d: Any, loss: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = (np.asarray(x, dtype=float).ravel() for x in (n, d, loss))
    if not len(n) == len(d) == len(loss):
        raise ValueError(f"N, D and L must have one value per run; found {len(n)}, {len(d)} and {len(loss)}")
    if len(n) < 5:
        raise ValueError(f"a law with 5 parameters needs at least 5 runs; found {len(n)}")
    for name, x in (("N", n), ("D", d), ("L", loss)):
        if not np.all(np.isfinite(x) & (x > 0)):
            raise ValueError(f"{name}: expected positive finite numbers, found {x[~(np.isfinite(x) & (x > 0))][:3]}")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2:
        raise ValueError(f"the grid needs at least 2 sizes N and 2 budgets D; found {len(np.unique(n))} and "
                         f"{len(np.unique(d))}")
    return n, d, loss


def fit_law(n: Any, d: Any, loss: Any, *, delta: float = 1e-3, inits: dict[str, Sequence[float]] | None = None,
            starts: int = 8, bootstrap: int = 200, confidence: float = 0.95, seed: int = 0) -> LawFit:
    """Fit L(N, D) = E + A/N^α + B/D^β to final losses (Hoffmann et al. 2022, approach 3): Huber_δ loss on log L,
    the `starts` best points of the initialisation grid (`inits`, default `DEFAULT_INITS`) optimised by L-BFGS-B,
    the best kept; then `bootstrap` refits on points resampled with replacement (each from the full fit and from the
    grid's best point, so a parameter the full fit pinned to a bound can move) give percentile intervals of level
    `confidence`."""
    with _one_blas_thread():
        return _fit(*_check_points(n, d, loss), delta, inits, starts, bootstrap, confidence, seed)


def _one_blas_thread():
    """L-BFGS-B on 5 parameters calls BLAS on vectors of 5: threads only cost (3-8× slower on a busy machine).
    threadpoolctl limits them when it is installed; otherwise nothing changes."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _fit(n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float, inits: dict[str, Sequence[float]] | None,
         starts: int, bootstrap: int, confidence: float, seed: int) -> LawFit:
    if delta <= 0 or starts < 1 or bootstrap < 0 or not 0 < confidence < 1:
        raise ValueError(f"expected delta > 0, starts >= 1, bootstrap >= 0 and 0 < confidence < 1; found delta "
                         f"{delta}, starts {starts}, bootstrap {bootstrap}, confidence {confidence}")
    logn, logd, logl = np.log(n), np.log(d), np.log(loss)
    grid = _grid(inits or DEFAULT_INITS)
    ones = np.ones_like(logn)
    top = grid[np.argsort(_score_grid(grid, logn, logd, logl, ones, delta))[:starts]]
    theta, value = _minimise(top, logn, logd, logl, ones, delta)
    fit = _to_fit(theta, value, len(n))
    fit.rms_log_error = float(np.sqrt(np.mean((np.log(predict(fit, n, d)) - logl) ** 2)))
    if bootstrap:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(bootstrap):
            # the multiplicity of each point in a resample is its weight: the same sum as refitting the copies
            w = np.bincount(rng.integers(0, len(n), len(n)), minlength=len(n)).astype(float)
            if (w > 0).sum() < 5:
                continue
            t, v = _minimise(np.vstack([theta, top[:1]]), logn, logd, logl, w, delta)
            f = _to_fit(t, v, len(n))
            draws.append([getattr(f, k) for k in PARAMS] + list(f.exponents))
        if not draws:  # every resample had fewer than 5 distinct runs: no interval
            return fit
        arr = np.array(draws)
        lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)
        names = (*PARAMS, "a", "b")
        fit.ci = {k: (float(np.percentile(arr[:, i], lo)), float(np.percentile(arr[:, i], hi)))
                  for i, k in enumerate(names)}
        fit.bootstrap, fit.confidence = len(draws), confidence
        fit.samples = arr[:, :5].tolist()
    return fit


def _to_fit(theta: np.ndarray, value: float, points: int) -> LawFit:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return LawFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, loss=value, points=points)
