"""The bf16 precision context on a CPU without native bf16: linears through fp32 GEMMs on the same bf16-rounded
operands (WidenedLinear) agree with autocast's own bf16 linear in value and gradient, and a model under the
context matches the model under plain autocast; `widened` does the same for a bf16 model's evaluation; `auto`
resolves by hardware, which is read from the CPU's flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge import precision
from lmforge.models import ModelConfig, Transformer


def test_widened_linear_matches_autocast_bf16_in_value_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 96, requires_grad=True)
    w = torch.randn(80, 96, requires_grad=True)
    b = torch.randn(80, requires_grad=True)
    g = torch.randn(4, 7, 80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.linear(x, w, b)
    ref.backward(g)
    want = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    bf = torch.bfloat16
    out = precision.WidenedLinear.apply(x.to(bf), w.to(bf), b.to(bf))
    out.backward(g.to(bf))
    assert out.dtype == ref.dtype == bf
    assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    for got, exp in zip((x.grad, w.grad, b.grad), want):
        assert got.dtype == exp.dtype and (got - exp).abs().max() <= 2e-2 * exp.abs().max()


@pytest.mark.skipif(precision.NATIVE_BF16, reason="this CPU multiplies bf16 natively: plain autocast is used")
def test_bf16_context_routes_linears_and_matches_autocast():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96))
    ids = torch.randint(0, 64, (2, 12))
    calls = []
    apply = precision.WidenedLinear.apply
    precision.WidenedLinear.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        with precision.autocast("bf16", "cpu"):
            ours = model(ids, labels=ids).extra["loss_sum"]
    finally:
        precision.WidenedLinear.apply = apply
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(ids, labels=ids).extra["loss_sum"]
    assert len(calls) >= 2 * 7  # every block linear of both layers went through the fp32 GEMM
    assert abs(ours.item() - ref.item()) <= 1e-2 * abs(ref.item())


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_bf16_matmuls_are_fast(monkeypatch, native):
    monkeypatch.setattr(precision, "NATIVE_BF16", native)
    assert precision.resolve("auto", "cpu") == ("bf16" if native else "fp32")
    asked = []
    for major, want in ((8, "bf16"), (9, "bf16"), (7, "fp16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or (major, 0))
        assert precision.resolve("auto", "cuda:1") == want
    assert asked == [torch.device("cuda:1")] * 3
    for explicit in ("fp32", "bf16", "fp16"):
        assert precision.resolve(explicit, "cpu") == explicit


def test_auto_precision_is_decided_when_the_config_is_made(tmp_path):
    from lmforge.config import load_config, save_config
    from lmforge.engine.trainer import TrainConfig

    cfg = load_config(TrainConfig, overrides=["precision=auto", "device=cpu"])
    assert cfg.precision == ("bf16" if precision.NATIVE_BF16 else "fp32")
    save_config(cfg, tmp_path / "config.yaml")
    assert f"precision: {cfg.precision}\n" in (tmp_path / "config.yaml").read_text()


@pytest.mark.skipif(precision.NATIVE_BF16, reason="this CPU multiplies bf16 natively: widened() changes nothing")
def test_widened_routes_a_bf16_models_linears_only_and_keeps_its_log_likelihood():
    from lmforge.eval.harness import rolling_loglikelihood

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96))
    ids = torch.randint(0, 64, (24,))
    calls = []
    apply = precision.WidenedLinear.apply
    precision.WidenedLinear.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        rolling_loglikelihood(model, ids.tolist(), max_length=24)
        assert not calls  # an fp32 model keeps its fp32 linears
        model.to(torch.bfloat16)
        ours, n = rolling_loglikelihood(model, ids.tolist(), max_length=24)
        assert len(calls) >= 2 * 7  # every block linear of both layers went through the fp32 GEMM
    finally:
        precision.WidenedLinear.apply = apply
    with torch.inference_mode():  # the same bf16 model with oneDNN's own bf16 linears
        logp = torch.log_softmax(model(ids[None, :-1]).logits.float(), -1)[0].gather(-1, ids[1:, None]).sum().item()
    assert n == 23 and abs(ours - logp) <= 1e-2 * abs(logp)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_native_bf16_is_what_the_cpu_flags_say():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert precision.NATIVE_BF16 == bool({"avx512_bf16", "amx_bf16"} & flags)
