"""Round-to-nearest int8 / int4 quantization: the QuantLinear format, its error bounds, llama.cpp's block formulas,
the model forward, and exact save / reload."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lmforge
from lmforge.errors import InputError
from lmforge.models.presets import preset
from lmforge.models.transformer import Transformer
from lmforge.transforms import count_parameters
from lmforge.transforms.quant import (QuantLinear, dequantize_weight, pack_int4, quantization_config,
                                      quantize_embedding, quantize_rtn, quantize_weight, save_quantized, unpack_int4)

SETTINGS = [(bits, group, sym) for bits in (8, 4) for group in (None, 32) for sym in (True, False)]


def tiny(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("llama-tiny", **overrides)).eval()


def test_hand_computed_codes():
    # 8-bit symmetric: d = fp16(1/127) = 2^-7 + 8·2^-17; q = round(w / d) = round([63.504, -127.006, 31.75, 0])
    codes, scale, mn = quantize_weight(torch.tensor([[0.5, -1.0, 0.25, 0.0]]), 8, None, True)
    assert mn is None and scale.dtype == torch.float16 and float(scale) == 2**-7 + 8 * 2**-17
    assert codes.dtype == torch.int8 and codes.tolist() == [[64, -127, 32, 0]]
    # 4-bit symmetric (Q4_0): d = (signed value of largest magnitude) / -8 = -0.8 / -8 -> fp16(0.1); the opposite
    # extreme 0.79 / d = 7.9 clips to 7; codes q + 8 = [9, 0, 11, 15] packed low nibble first: [9, 11 | 15 << 4]
    codes, scale, _ = quantize_weight(torch.tensor([[0.1, -0.8, 0.3, 0.79]]), 4, None, True)
    assert float(scale) == float(torch.tensor(0.1).half())
    assert codes.dtype == torch.uint8 and codes.tolist() == [[9, 11 | 15 << 4]]
    # 4-bit asymmetric (Q4_1): min = -1, d = fp16(3 / 15) = 0.19995; q = round((w - min) / d) = round([0, 15.004,
    # 5.0012, 7.5018])
    codes, scale, mn = quantize_weight(torch.tensor([[-1.0, 2.0, 0.0, 0.5]]), 4, None, False)
    assert float(mn) == -1.0 and float(scale) == float(torch.tensor(0.2).half())
    assert unpack_int4(codes).tolist() == [[0, 15, 5, 8]]


def test_pack_unpack_round_trip():
    assert pack_int4(torch.tensor([[1, 2, 3, 4]])).tolist() == [[0x21, 0x43]]
    torch.manual_seed(0)
    c = torch.randint(0, 16, (7, 40), dtype=torch.uint8)
    packed = pack_int4(c)
    assert packed.shape == (7, 20) and torch.equal(unpack_int4(packed), c)


@pytest.mark.parametrize("bits,group,sym", SETTINGS)
def test_error_bound_and_code_range(bits, group, sym):
    torch.manual_seed(1)
    w = torch.randn(24, 96) * torch.logspace(-2, 1, 96)  # columns of very different magnitudes
    codes, scale, mn = quantize_weight(w, bits, group, sym)
    g = group or 96
    assert scale.shape == (24, 96 // g) and scale.dtype == torch.float16
    assert (mn is None) == sym and (mn is None or (mn.shape == scale.shape and mn.dtype == torch.float16))
    if bits == 8:
        assert codes.shape == (24, 96) and codes.dtype == (torch.int8 if sym else torch.uint8)
        q = codes.float()
    else:
        assert codes.shape == (24, 48) and codes.dtype == torch.uint8
        q = unpack_int4(codes).float()
        assert q.max() <= 15
    w_hat = dequantize_weight(codes, scale, mn, bits, sym)
    d = scale.float().abs().repeat_interleave(g, 1)  # (out, in)
    err = (w - w_hat).abs()
    if sym and bits == 4:  # Q4_0's grid is [-8, 7]·d: values beyond 7.5 steps on the far side clip to 7 steps
        inside = (w / scale.float().repeat_interleave(g, 1)) <= 7.5
        assert (err[inside] <= d[inside] / 2 * (1 + 1e-5) + 1e-7).all()
        assert (err <= d * (1 + 1e-5)).all()
        assert (q == 0).sum() >= scale.numel()  # every group's extreme value sits on code 0 (-8)
    else:  # (a float16-rounded scale can leave the extreme up to 2^-11 · 127 steps beyond the grid: < d/2 still)
        assert (err <= d / 2 * (1 + 1e-5) + 1e-7).all()
    # dequantization is exactly scale·q (+ min) in float32 from the float16 scale
    qs = q - 8 if (bits == 4 and sym) else q
    expect = scale.float().repeat_interleave(g, 1) * qs
    if mn is not None:
        expect = expect + mn.float().repeat_interleave(g, 1)
    assert torch.equal(w_hat, expect)


def test_groups_beat_per_channel():
    torch.manual_seed(2)
    w = torch.randn(32, 128) * torch.logspace(-2, 0, 128)
    for bits in (8, 4):
        errs = {g: (w - dequantize_weight(*quantize_weight(w, bits, g, True)[:3], bits, True)).pow(2).mean()
                for g in (None, 32)}
        assert errs[32] < errs[None] * 0.5


def _blocks(codes: np.ndarray, scale: np.ndarray, mn: np.ndarray | None, bits: int) -> np.ndarray:
    """GGUF block bytes (Q8_0, Q4_0, Q4_1) of our codes, group 32: d (fp16) [m (fp16)] and the quants; llama.cpp
    packs a 4-bit block as byte j = element j | element j + 16 << 4."""
    rows = []
    for r in range(codes.shape[0]):
        out = []
        for b in range(scale.shape[1]):
            head = [np.float16(scale[r, b]).reshape(1).view(np.uint8)]
            if mn is not None:
                head.append(np.float16(mn[r, b]).reshape(1).view(np.uint8))
            c = codes[r, b * 32:(b + 1) * 32]
            qs = c.view(np.uint8) if bits == 8 else (c[:16] | (c[16:] << 4)).astype(np.uint8)
            out.append(np.concatenate(head + [qs]))
        rows.append(np.concatenate(out))
    return np.stack(rows)


@pytest.mark.parametrize("bits,sym,qtype", [(8, True, "Q8_0"), (4, True, "Q4_0"), (4, False, "Q4_1")])
def test_same_numbers_as_llama_cpp_blocks(bits, sym, qtype):
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(3)
    w = torch.randn(6, 128)
    codes, scale, mn = quantize_weight(w, bits, 32, sym)
    ours = dequantize_weight(codes, scale, mn, bits, sym)
    raw = codes.numpy() if bits == 8 else unpack_int4(codes).numpy()
    kind = gguf.GGMLQuantizationType[qtype]
    blocks = _blocks(raw, scale.numpy(), None if mn is None else mn.numpy(), bits)
    theirs = gguf.quants.dequantize(blocks, kind)
    assert np.array_equal(ours.numpy(), theirs.reshape(6, 128))
    # and our rule is llama.cpp's rule: its own quantization of w gives the same numbers but for rare ties
    their_codes = gguf.quants.quantize(w.numpy(), kind)
    same = gguf.quants.dequantize(their_codes, kind).reshape(6, 128) == ours.numpy()
    assert same.mean() > 0.98


def test_bad_settings_are_clear_errors():
    w = torch.randn(4, 48)
    with pytest.raises(ValueError, match="group_size 32 does not divide in_features 48"):
        quantize_weight(w, 4, 32, True)
    with pytest.raises(ValueError, match=r"bits is 3, expected one of \(4, 8\)"):
        quantize_weight(w, 3, None, True)
    with pytest.raises(ValueError, match="must be even"):
        quantize_weight(torch.randn(4, 9), 4, None, True)
    with pytest.raises(ValueError, match="group_size 32 does not divide in_features 48"):
        QuantLinear(48, 4, bits=4, group_size=32)
    with pytest.raises(ValueError, match="match no float linear"):
        quantize_rtn(tiny(), 8, modules=["attn.qq"])


@pytest.mark.parametrize("bits,group,sym", SETTINGS)
def test_forward_equals_float_model_with_dequantized_weights(bits, group, sym):
    model = tiny(qkv_bias=True, out_bias=True)
    q_model = quantize_rtn(copy.deepcopy(model), bits, group, sym)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in q_model.named_modules():
            if isinstance(m, QuantLinear):
                ref.get_submodule(name).weight.copy_(m.dequantize())
    x = torch.randint(0, 512, (2, 12))
    assert torch.equal(q_model(x).logits, ref(x).logits)
    assert not torch.equal(q_model(x).logits, model(x).logits)  # it did quantize
    names = [n for n, m in q_model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 2 * 7 and all(n.startswith("blocks.") for n in names)
    assert type(q_model.embed.tokens) is nn.Embedding
    assert count_parameters(q_model)[1] == model.num_parameters()


def test_int8_matmul_path_matches_dequantized():
    torch.manual_seed(4)
    lin = nn.Linear(64, 96)
    q = QuantLinear.from_linear(lin, 8, None, True)
    x = torch.randn(3, 64, dtype=torch.bfloat16)  # a decode-sized bf16 batch takes torch's int8 matmul
    fast = q(x).float()
    slow = (x.float() @ q.dequantize().bfloat16().float().t() + q.bias.bfloat16().float())
    assert (fast - slow).abs().max() <= 0.02 * slow.abs().max()


def test_dtype_casts_keep_the_storage_format():
    model = quantize_rtn(tiny(), 4, 32, False)
    before = {k: v.clone() for k, v in model.state_dict().items() if ".weight_" in k or k.endswith("q.weight")}
    model.to(torch.bfloat16)
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v)
    assert model.embed.tokens.weight.dtype == torch.bfloat16
    assert model(torch.randint(0, 512, (1, 5))).logits.dtype == torch.bfloat16


def test_quantization_config_and_selection():
    model = quantize_rtn(tiny(), 8, 32, True, modules=["mlp.down", r"blocks\.1\.attn\.q"])
    qc = quantization_config(model)
    assert qc == {"quant_method": "lmforge", "method": "rtn", "bits": 8, "group_size": 32, "symmetric": True,
                  "modules": ["blocks.0.mlp.down", "blocks.1.attn.q", "blocks.1.mlp.down"]}
    quantize_rtn(model, 4, None, True, modules=["attn.k"])
    with pytest.raises(ValueError, match="mix quantization settings"):
        quantization_config(model)


@pytest.mark.parametrize("bits,group,sym", [(8, None, True), (4, 32, False), (8, 32, False), (4, None, True)])
def test_save_load_exact(tmp_path, bits, group, sym):
    model = quantize_rtn(tiny(qkv_bias=True, family="qwen2", tie_embeddings=False), bits, group, sym)
    save_quantized(model, None, tmp_path / "q")
    conf = json.loads((tmp_path / "q" / "config.json").read_text())
    assert conf["quantization_config"] == quantization_config(model)
    loaded, _ = lmforge.load(tmp_path / "q")
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    x = torch.randint(0, 512, (2, 9))
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_save_bf16_casts_floats_only(tmp_path):
    model = quantize_rtn(tiny(), 4, 32, True)
    save_quantized(model, None, tmp_path / "q", dtype=torch.bfloat16)
    raw = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert raw["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert raw["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert raw["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float16
    loaded, _ = lmforge.load(tmp_path / "q")
    assert torch.equal(loaded.blocks[0].attn.q.weight, model.blocks[0].attn.q.weight)
    assert torch.equal(loaded.blocks[0].attn.q.weight_scale, model.blocks[0].attn.q.weight_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_embedding_is_stored_as_codes_and_reloads_and_resaves_identically(tmp_path, dtype):
    model = tiny().to(dtype)
    float_emb = model.embed.tokens.weight.detach().float().clone()
    quantize_rtn(model, 8, None, True)
    quantize_embedding(model)
    codes, scale, _ = quantize_weight(float_emb, 8, None, True)
    dq = dequantize_weight(codes, scale, None, 8, True)  # (V, C) float32
    assert torch.equal(model.embed.tokens.weight, dq.to(dtype))  # the model computes with the int8 values
    assert 0 < (dq - float_emb).abs().max() <= scale.float().max() / 2 + 1e-6
    save_quantized(model, None, tmp_path / "q")
    raw = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert raw["model.embed_tokens.weight"].dtype == torch.int8 and torch.equal(raw["model.embed_tokens.weight"], codes)
    assert torch.equal(raw["model.embed_tokens.weight_scale"], scale)
    conf = json.loads((tmp_path / "q" / "config.json").read_text())
    assert conf["quantization_config"]["embedding_bits"] == 8 and conf["dtype"] == str(dtype)[6:]
    loaded, _ = lmforge.load(tmp_path / "q", dtype=dtype)
    assert torch.equal(loaded.embed.tokens.weight, model.embed.tokens.weight)
    as_saved, _ = lmforge.load(tmp_path / "q")  # no dtype given: the embedding comes back in the saved dtype too
    assert as_saved.embed.tokens.weight.dtype == as_saved.norm.weight.dtype == dtype
    x = torch.randint(0, 512, (2, 9))
    if dtype == torch.float32:  # (a model cast to bfloat16 keeps bfloat16 RoPE frequencies, a loaded one float32)
        assert torch.equal(loaded(x).logits, model(x).logits)  # the tied head uses the same int8 values
    save_quantized(loaded, None, tmp_path / "again")
    assert load_file(str(tmp_path / "again" / "model.safetensors")).keys() == raw.keys()
    for k, v in load_file(str(tmp_path / "again" / "model.safetensors")).items():
        assert torch.equal(v, raw[k]), k
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    save_quantized(quantize_rtn(tiny(), 8, None, True), None, tmp_path / "float-embedding")
    assert size < (tmp_path / "float-embedding" / "model.safetensors").stat().st_size
    raw.pop("model.embed_tokens.weight_scale")
    save_file(raw, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(InputError, match="embedding_bits is 8 but the weights hold no int8"):
        lmforge.load(tmp_path / "q")


def test_load_rejects_tampered_folders(tmp_path):
    model = quantize_rtn(tiny(), 8, 32, True)
    save_quantized(model, None, tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    raw = load_file(str(path))
    key = "model.layers.1.mlp.down_proj.weight_scale"
    save_file({k: v for k, v in raw.items() if k != key}, str(path))
    with pytest.raises(InputError, match=r"missing \['blocks.1.mlp.down.weight_scale'\]"):
        lmforge.load(tmp_path / "q")
    save_file({**raw, key: raw[key].float()}, str(path))
    with pytest.raises(InputError, match="down.weight_scale is float32 .* expected float16"):
        lmforge.load(tmp_path / "q")
    save_file(raw, str(path))
    conf = json.loads((tmp_path / "q" / "config.json").read_text())
    conf["quantization_config"]["modules"].append("blocks.0.attn_norm")
    (tmp_path / "q" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(InputError, match="blocks.0.attn_norm.*not a linear layer"):
        lmforge.load(tmp_path / "q")


def test_nf4_folder_reloads_the_same_codes_and_state(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lmforge.transforms.quantize import NF4Linear, quantize_nf4

    model = quantize_nf4(tiny(qkv_bias=True, family="qwen2", tie_embeddings=False))
    quantize_embedding(model)
    save_quantized(model, None, tmp_path / "nf4")
    qc = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "nf4" and qc["block_size"] == 64 and qc["double_quant"] and len(qc["modules"]) == 14
    assert qc["embedding_bits"] == 8
    loaded, _ = lmforge.load(tmp_path / "nf4")
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    layer = loaded.blocks[1].mlp.down
    assert isinstance(layer, NF4Linear) and torch.equal(layer.dequantize(), model.blocks[1].mlp.down.dequantize())
    x = torch.randint(0, 512, (2, 9))
    assert torch.equal(loaded(x).logits, model(x).logits)
    raw = load_file(str(tmp_path / "nf4" / "model.safetensors"))
    save_file({k: v for k, v in raw.items() if not k.endswith("mlp.up_proj.weight_absmax")},
              str(tmp_path / "nf4" / "model.safetensors"))
    with pytest.raises(InputError, match=r"NF4 layer blocks.0.mlp.up lacks \['weight_absmax'\]"):
        lmforge.load(tmp_path / "nf4")
