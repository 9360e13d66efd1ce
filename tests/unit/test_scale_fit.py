"""Scaling-law fits (`lmforge.plan.fit`, Hoffmann et al. 2022 approach 3) against synthetic losses from a known law:
exact recovery without noise, α and β within ±0.03 with 2% noise over a 4×5 grid, bootstrap intervals that cover
the truth, the compute-optimal frontier against a brute-force search on the line 6·N·D = C, and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmforge.plan.fit import LawFit, compute_optimal, fit_law, interval, law_from_dict, predict

TRUTH = LawFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al.'s own fit
N_GRID = np.geomspace(1e6, 1e10, 4)
D_GRID = np.geomspace(1e8, 1e12, 5)


def grid_points(noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 4×5 grid's (N, D, L): L from TRUTH times (1 + u), u uniform in ±noise."""
    n, d = (g.ravel() for g in np.meshgrid(N_GRID, D_GRID, indexing="ij"))
    u = np.random.default_rng(seed).uniform(-noise, noise, n.shape)
    return n, d, predict(TRUTH, n, d) * (1 + u)


def test_noiseless_losses_give_back_the_law() -> None:
    fit = fit_law(*grid_points(), bootstrap=0)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(TRUTH, name), rel=2e-3), name
    assert fit.rms_log_error < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_percent_noise_recovers_the_exponents(seed: int) -> None:
    n, d, loss = grid_points(noise=0.02, seed=seed)
    fit = fit_law(n, d, loss, bootstrap=0)
    assert abs(fit.alpha - TRUTH.alpha) <= 0.03
    assert abs(fit.beta - TRUTH.beta) <= 0.03
    assert fit.rms_log_error < 0.02  # the noise, not a misfit


def test_bootstrap_intervals_cover_the_truth_and_shrink_with_less_noise() -> None:
    noisy = fit_law(*grid_points(noise=0.02, seed=3), bootstrap=60, seed=0)
    quiet = fit_law(*grid_points(noise=0.002, seed=3), bootstrap=60, seed=0)
    assert noisy.bootstrap == 60 and len(noisy.samples) == 60
    for name in ("alpha", "beta", "E"):
        lo, hi = noisy.ci[name]
        assert lo <= getattr(TRUTH, name) <= hi, (name, lo, hi)
        assert quiet.ci[name][1] - quiet.ci[name][0] < (hi - lo) / 3, name
    lo, hi = interval(noisy, 3e10, 3e12)  # an extrapolation: its interval holds the law's own prediction
    assert lo <= predict(noisy, 3e10, 3e12) <= hi


def test_frontier_minimises_the_loss_on_the_compute_line() -> None:
    for flops in (1e18, 1e21, 1e24):
        opt = compute_optimal(TRUTH, flops)
        assert 6 * opt.params * opt.tokens == pytest.approx(flops, rel=1e-9)
        n = np.geomspace(opt.params / 100, opt.params * 100, 20001)
        brute = n[np.argmin(predict(TRUTH, n, flops / (6 * n)))]
        assert opt.params == pytest.approx(brute, rel=2e-3)
        assert opt.loss == pytest.approx(predict(TRUTH, opt.params, opt.tokens))
    # N_opt grows as C^(β/(α+β)): 1000× the compute, 1000^(0.28/0.62) × the parameters
    ratio = compute_optimal(TRUTH, 1e24).params / compute_optimal(TRUTH, 1e21).params
    assert math.log(ratio, 1000) == pytest.approx(0.28 / 0.62, rel=1e-9)


def test_a_law_round_trips_through_its_dict() -> None:
    fit = fit_law(*grid_points(noise=0.01, seed=4), bootstrap=10)
    back = law_from_dict(fit.to_dict())
    assert (back.E, back.A, back.B, back.alpha, back.beta) == (fit.E, fit.A, fit.B, fit.alpha, fit.beta)
    assert back.ci == fit.ci and back.samples == fit.samples


def test_bad_input_is_one_clear_error() -> None:
    n, d, loss = grid_points()
    with pytest.raises(ValueError, match="at least 5 runs"):
        fit_law(n[:4], d[:4], loss[:4])
    with pytest.raises(ValueError, match="one value per run"):
        fit_law(n, d[:-1], loss)
    with pytest.raises(ValueError, match="L: expected positive"):
        fit_law(n, d, np.where(np.arange(len(n)) == 2, -1.0, loss))
    with pytest.raises(ValueError, match="2 sizes N"):
        fit_law(np.full_like(n, 1e7), d, loss)
    with pytest.raises(ValueError, match="missing or not numeric: beta"):
        law_from_dict({"E": 1, "A": 2, "B": 3, "alpha": 0.3})
    with pytest.raises(ValueError, match="positive FLOP budget"):
        compute_optimal(TRUTH, 0)


def test_plan_uses_a_fitted_law(tmp_path, capsys) -> None:
    """`lmforge plan --law scale.json --flops C` gives the law's compute-optimal N and D; with a model, the loss the
    law predicts for its run (N counted as the law counts it)."""
    import json

    from lmforge import cli
    from lmforge.plan.counts import count_parameters
    from lmforge.plan.source import model_config

    fit = fit_law(*grid_points(noise=0.01, seed=5), bootstrap=10)
    law = tmp_path / "scale.json"
    law.write_text(json.dumps({"params": "non_embedding", "fit": fit.to_dict()}))
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--law", str(law), "--flops", "1e21", f"output={out}"]) == 0
    got = json.loads(out.read_text())["law"]["compute_optimal"]
    want = compute_optimal(fit, 1e21)
    assert got["params"] == pytest.approx(want.params) and got["tokens"] == pytest.approx(want.tokens)
    assert "N_opt" in capsys.readouterr().out
    assert cli.main(["plan", "llama-7m", "--law", str(law), "--tokens", "1e9", f"output={out}"]) == 0
    run = json.loads(out.read_text())["law"]["run"]
    n = count_parameters(model_config("llama-7m")).non_embedding
    assert run["N"] == n and run["loss"] == pytest.approx(predict(fit, n, 1e9))
    assert cli.main(["plan", "--law", str(tmp_path / "missing.json"), "--flops", "1e21", "output="]) == 2
    assert "not a fitted law" in capsys.readouterr().err


def test_without_scipy_the_error_names_the_extra(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ImportError, match=r"pip install 'lmforge\[scale\]'"):
        fit_law(*grid_points(), bootstrap=0)
