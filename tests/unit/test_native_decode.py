"""The native decode step (inference/native): its matrix-vector kernel in every weight storage format against the
dequantized weights, and whole decode steps against the PyTorch path and full forward passes (float32 greedy
identical; integer models as their PyTorch layers; bfloat16 within bfloat16 rounding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.inference import native
from lmforge.inference.engine import Engine, EngineConfig, SamplingParams
from lmforge.models import ModelConfig, Transformer
from lmforge.transforms.quant import QuantLinear, quantize_embedding, quantize_rtn

GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3], [40, 41, 42], list(range(1, 70))]


@pytest.fixture(scope="module")
def kernels():
    module = native.load()
    assert module is not None, native.why_not()  # this machine has a compiler and AVX-512: it must build
    return module


def _model(dtype=torch.float32, **kw) -> Transformer:
    base = dict(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                max_position_embeddings=128, tie_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**base, **kw})).to(dtype).eval()


def _decode(model, native_decode: bool, prompts=PROMPTS, params=GREEDY):
    engine = Engine(model, config=EngineConfig(block_size=4, native_decode=native_decode))
    assert (engine.decode_path == "native") == native_decode, engine.decode_path
    return engine.generate(prompts, params)


@pytest.mark.parametrize("bits,group,symmetric", [(None, None, None), (8, None, True), (8, 32, True),
                                                  (8, 64, False), (4, 32, True), (4, 16, False), (4, None, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# 1 row: one token, four weight rows at a time; 7: tiles of 4 rows of x and a remainder of 3, each weight row widened
# in registers; 11: weights widened to float32 in blocks of 16 rows (1024 inputs), met by x in tiles of 4, 4 and 3
@pytest.mark.parametrize("rows", [1, 7, 11])
def test_kernel_equals_the_dequantized_weight_in_every_storage_format(kernels, bits, group, symmetric, dtype, rows):
    torch.manual_seed(0)
    # 83 outputs: each thread's share ends in a remainder of weight rows (and of a block)
    lin = nn.Linear(1024, 83).to(dtype)
    x = torch.randn(rows, 1024)
    empty = torch.empty(0)
    if bits is None:
        parts, w = [lin.weight, empty, empty, lin.bias], lin.weight.float()
    else:
        q = QuantLinear.from_linear(lin, bits, group, symmetric)
        parts = [q.weight, q.weight_scale, q.weight_min if q.weight_min is not None else empty, q.bias]
        w = q.dequantize()
    y = kernels.linear(x, parts)
    ref = x.double() @ w.double().T + lin.bias.double()
    assert (y.double() - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.parametrize("kw", [{}, dict(qkv_bias=True, tie_embeddings=True), dict(sliding_window=6),
                                dict(num_kv_heads=4, rope_theta=500.0)], ids=["gqa", "qkv-bias-tied", "window", "mha"])
def test_float32_decode_is_identical_to_the_pytorch_path_and_full_forward(kw):
    model = _model(**kw)
    ours, theirs = _decode(model, True), _decode(model, False)
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
    with torch.no_grad():  # and to the model's own full forward pass over each whole sequence
        for p, o in zip(PROMPTS, ours):
            x = torch.tensor([p + o.token_ids])
            assert model(x).logits[0, len(p) - 1:-1].argmax(-1).tolist() == o.token_ids


def test_float32_log_probs_agree_with_the_pytorch_path():
    model = _model()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=5)
    for a, b in zip(_decode(model, True, params=params), _decode(model, False, params=params)):
        for la, lb in zip(a.logprobs, b.logprobs):
            assert la.token_id == lb.token_id and abs(la.logprob - lb.logprob) < 1e-4


@pytest.mark.parametrize("bits,group", [(8, None), (8, 16), (4, 16), (4, None)])
def test_integer_models_decode_as_their_pytorch_layers(bits, group):
    model = quantize_rtn(_model(), bits, group, True)
    assert [o.token_ids for o in _decode(model, True)] == [o.token_ids for o in _decode(model, False)]


def test_an_int8_tied_embedding_is_read_as_its_codes():
    model = quantize_embedding(quantize_rtn(_model(tie_embeddings=True), 8))
    engine = Engine(model)
    head = engine.native[id(model)].head()
    assert head[0].dtype == torch.int8  # the head streams int8 codes, a quarter of float32
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == [o.token_ids for o in _decode(model, False)]


def test_bfloat16_decode_stays_within_bfloat16_rounding_of_float32():
    model = _model()
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, logprobs=20)
    ref = _decode(model, False, params=params)
    model.to(torch.bfloat16)
    errors = {}
    for nat in (True, False):  # the first token comes from the prompt's pass; the second from a decode step
        pairs = [(o, r) for o, r in zip(_decode(model, nat, params=params), ref) if o.token_ids[0] == r.token_ids[0]]
        assert len(pairs) >= 3  # bfloat16 may pick another first token where two are near-tied
        errors[nat] = max(abs(dict(o.logprobs[1].top).get(t, -1e9) - lp) for o, r in pairs
                          for t, lp in r.logprobs[1].top[:5])
    assert errors[True] < max(0.25, 2 * errors[False]), errors


def test_models_it_does_not_cover_fall_back_and_say_why():
    assert Engine(_model(mlp="plain")).decode_path == "pytorch (architecture not covered (mlp='plain'))"
    assert "multiples of 16" in Engine(_model(hidden_size=40, num_heads=4)).decode_path
    from lmforge.transforms.lora import LoraConfig, apply_lora

    lora = apply_lora(_model(), LoraConfig(rank=4))
    assert Engine(lora).decode_path.startswith("pytorch (layer ")
    assert Engine(_model(), config=EngineConfig(native_decode=False)).decode_path == "pytorch (native_decode is off)"
