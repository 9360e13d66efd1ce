"""LoRA, QLoRA (NF4) and the PEFT adapter folder, on tiny random models."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from torch import nn

import lmforge
from lmforge.models import Transformer
from lmforge.models.presets import preset
from lmforge.objectives.causal_lm import CausalLM
from lmforge.transforms import (LoraConfig, LoRALinear, NF4Linear, adapter_names, apply_lora, count_parameters,
                                dequantize_nf4, load_adapter, merge_lora, save_adapter, set_adapter, unmerge_lora,
                                unwrap_lora)

FAMILIES = ["llama-tiny", "bert-tiny", "gpt2-tiny"]


def _model(name: str = "llama-tiny", **overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset(name, **overrides)).eval()


def _ids(batch: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(0, 512, (batch, t), generator=torch.Generator().manual_seed(1))


def _out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _perturb_b(model: nn.Module, name: str = "default", std: float = 0.1) -> None:
    with torch.no_grad():
        for w in model.modules():
            if isinstance(w, LoRALinear) and name in w.lora_B:
                w.lora_B[name].weight.normal_(0.0, std)


def _batch() -> dict[str, torch.Tensor]:
    ids = _ids(4, 24)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


# ---- LoRA ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_is_exactly_the_base(family):
    model = _model(family)
    ids = _ids()
    base = _out(model, ids)
    apply_lora(model, LoraConfig())
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == model.cfg.num_layers * (7 if family == "llama-tiny" else 6)
    assert torch.equal(_out(model, ids), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_matches_unmerged_and_unmerge_restores(family):
    model = _model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    _perturb_b(model)
    unmerged = _out(model, ids)
    assert (unmerged - _out(set_adapter(copy.deepcopy(model), None), ids)).abs().max() > 1e-3
    merge_lora(model)
    assert all(m.merged == "default" for m in model.modules() if isinstance(m, LoRALinear))
    assert (_out(model, ids) - unmerged).abs().max() <= 1e-5  # merged forward does not add B·A twice
    merge_lora(model)  # idempotent
    assert (_out(model, ids) - unmerged).abs().max() <= 1e-5
    unmerge_lora(model)
    now = model.state_dict()
    for k, v in original.items():
        torch.testing.assert_close(now[k], v, rtol=0, atol=1e-6, msg=k)
    assert (_out(model, ids) - unmerged).abs().max() <= 1e-5


def test_training_moves_only_the_adapters():
    model = _model().train()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(rank=4))
    sd = model.state_dict()
    assert set(base_sd) <= set(sd) and all(torch.equal(sd[k], v) for k, v in base_sd.items())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = _batch()
    for _ in range(3):
        loss, _ = CausalLM()(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"


def test_two_adapters_switch_by_name():
    model = _model()
    ids = _ids()
    base = _out(model, ids)
    apply_lora(model, LoraConfig(rank=4))
    _perturb_b(model, "default")
    apply_lora(model, LoraConfig(rank=2, targets=["blocks.*.mlp.*"]), name="mlp")
    _perturb_b(model, "mlp")
    assert adapter_names(model) == ["default", "mlp"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mlp." in n for n in trainable), "only the newest adapter is trainable"
    mlp_out = _out(model, ids)  # apply_lora made 'mlp' active
    default_out = _out(set_adapter(model, "default"), ids)
    assert (mlp_out - default_out).abs().max() > 1e-3 and (default_out - base).abs().max() > 1e-3
    assert torch.equal(_out(set_adapter(model, "mlp"), ids), mlp_out)
    assert model.blocks[0].attn.q.active is None  # layers without 'mlp' compute the base
    assert torch.equal(_out(set_adapter(model, None), ids), base)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        set_adapter(model, "nope")


def test_count_parameters_one_4096_linear_rank_8():
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(4096, 4096, bias=False)

    with torch.device("meta"):
        model = apply_lora(One(), LoraConfig(rank=8, targets=["q"]))
    assert count_parameters(model) == (65_536, 16_777_216 + 65_536)


def test_device_and_dtype_moves_and_deepcopy_keep_the_shared_weight():
    model = apply_lora(_model(), LoraConfig())
    model.to(torch.float64)
    layer = model.blocks[0].attn.q
    assert layer.weight is layer.base_layer.weight and layer.weight.dtype == torch.float64
    assert layer.lora_A["default"].weight.dtype == torch.float64
    twin = copy.deepcopy(model)
    assert twin.blocks[0].attn.q.weight is twin.blocks[0].attn.q.base_layer.weight
    assert twin.blocks[0].attn.q.weight is not layer.weight


def test_bf16_base_keeps_fp32_adapters_and_runs_without_autocast():
    model = apply_lora(_model().to(torch.bfloat16), LoraConfig())
    assert model.blocks[0].attn.q.lora_A["default"].weight.dtype == torch.float32
    _perturb_b(model)
    assert _out(model, _ids()).dtype == torch.bfloat16


def test_unwrap_after_merge_saves_a_plain_model(tmp_path):
    model = apply_lora(_model(), LoraConfig())
    _perturb_b(model)
    ids = _ids()
    expected = _out(model, ids)
    with pytest.raises(ValueError, match="merge_lora"):
        unwrap_lora(model)
    unwrap_lora(merge_lora(model))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    lmforge.save(model, None, tmp_path)
    again, _ = lmforge.load(tmp_path)
    assert (_out(again, ids) - expected).abs().max() <= 1e-5


def test_adapter_round_trip_through_the_peft_folder(tmp_path):
    model = apply_lora(_model(), LoraConfig(rank=4, alpha=4.0, targets=["q", "v"]), name="sql")
    _perturb_b(model, "sql")
    ids = _ids()
    save_adapter(model, tmp_path, name="sql", base_model_name_or_path="tiny")
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (conf["peft_type"], conf["task_type"], conf["r"], conf["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 4.0)
    assert conf["target_modules"] == ["q_proj", "v_proj"] and conf["base_model_name_or_path"] == "tiny"
    fresh = load_adapter(_model(), tmp_path, name="other", trainable=True)
    assert adapter_names(fresh) == ["other"]
    assert torch.equal(_out(fresh, ids), _out(model, ids))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, _ in fresh.named_parameters() if ".lora_" in n}



def test_adapter_of_a_bare_body_loads_into_a_model_with_a_head(tmp_path):
    """PEFT names carry the body prefix (model.) only when the model has a head; both spellings load."""
    body = apply_lora(_model(head="none"), LoraConfig(targets=["q", "up"]))
    _perturb_b(body)
    save_adapter(body, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["task_type"] == "FEATURE_EXTRACTION"
    lm = load_adapter(_model(), tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(lm(ids).hidden, body(ids).hidden)



# ---- QLoRA / NF4 -----------------------------------------------------------------------------------------------

def _normal_linear(out_f: int = 256, in_f: int = 512) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    nn.init.normal_(lin.weight, std=0.02)
    return lin


def test_nf4_dequantized_weight_is_close_and_beats_uniform_int4():
    """NF4's 16 levels are quantiles of N(0, 1), so for normal weights (blocks of 64 scaled by their absmax) the
    mean abs error is ~0.09 of the mean abs weight; absmax int4 (levels k/7) on the same blocks gives ~0.115."""
    lin = _normal_linear()
    w = lin.weight.detach()
    q = NF4Linear.from_linear(lin)
    assert q.dequantize().shape == w.shape and not any(p.requires_grad for p in q.parameters())
    nf4_err = ((q.dequantize() - w).abs().mean() / w.abs().mean()).item()
    blocks = w.reshape(-1, 64)
    scale = blocks.abs().amax(1, keepdim=True) / 7
    int4_err = (((blocks / scale).round() * scale).reshape_as(w) - w).abs().mean() / w.abs().mean()
    assert 0 < nf4_err < 0.15 and nf4_err < int4_err.item(), (nf4_err, int4_err.item())


def test_nf4_forward_matches_its_dequantized_weight():
    lin = _normal_linear()
    q = NF4Linear.from_linear(lin)
    x = torch.randn(3, 5, 512)
    y = q(x)
    assert y.shape == (3, 5, 256)
    torch.testing.assert_close(y, nn.functional.linear(x, q.dequantize(), lin.bias), rtol=0, atol=1e-5)
    ref = lin(x)
    assert ((y - ref).norm() / ref.norm()).item() < 0.15


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_storage_is_about_a_quarter_of_bf16(double_quant):
    q = NF4Linear.from_linear(_normal_linear(), double_quant=double_quant)
    ratio = q.nbytes() / (256 * 512 * 2)
    assert 0.24 <= ratio <= 0.32, ratio
    if double_quant:
        assert q.nbytes() < NF4Linear.from_linear(_normal_linear(), double_quant=False).nbytes()


def test_qlora_trains_under_bf16_autocast_with_a_frozen_4bit_base():
    model = apply_lora(_model().train(), LoraConfig(rank=8, targets=["q", "v"], quantize="nf4"))
    blocks = [n for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, (nn.Linear,
              NF4Linear, LoRALinear)) and ".lora_" not in n]
    nf4 = lambda m: isinstance(getattr(m, "base_layer", m), NF4Linear)  # noqa: E731
    assert blocks and all(nf4(model.get_submodule(n)) for n in blocks), "every block linear is quantized"
    assert isinstance(model.embed.tokens, nn.Embedding) and model.embed.tokens.weight.is_floating_point()
    trainable, total = count_parameters(model)
    assert total == _model().num_parameters() + trainable
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, losses = _batch(), []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = CausalLM()(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items()), "the quantized base changed"


def test_base_checkpoint_and_qlora_state_dict_load_into_a_qlora_model():
    base = _model()
    ids = _ids()
    qlora = apply_lora(_model(), LoraConfig(quantize="nf4"))
    _perturb_b(qlora)
    other = apply_lora(Transformer(preset("llama-tiny")).eval(), LoraConfig(quantize="nf4"))
    missing, unexpected = other.load_state_dict(base.state_dict(), strict=False)  # float weights: quantized
    assert not unexpected and all(".lora_" in k for k in missing)
    other.load_state_dict(qlora.state_dict())  # packed codes + quantization state
    assert torch.equal(_out(other, ids), _out(qlora, ids))


def test_qlora_merge_gives_a_float_model_that_saves(tmp_path):
    model = apply_lora(_model(), LoraConfig(targets=["q", "down"], quantize="nf4"))
    _perturb_b(model)
    ids = _ids()
    expected = _out(model, ids)
    merge_lora(model)
    assert type(model.blocks[0].attn.q.base_layer) is nn.Linear
    assert (_out(model, ids) - expected).abs().max() <= 1e-4
    dequantize_nf4(unwrap_lora(model))
    assert not any(isinstance(m, (NF4Linear, LoRALinear)) for m in model.modules())
    lmforge.save(model, None, tmp_path)
    again, _ = lmforge.load(tmp_path)
    assert (_out(again, ids) - expected).abs().max() <= 1e-4


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match=r"QLoRA needs bitsandbytes: pip install 'lmforge\[qlora\]'"):
        NF4Linear.from_linear(nn.Linear(64, 64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_moves_to_cuda_with_its_quantization_state():
    model = apply_lora(_model(), LoraConfig(quantize="nf4"))
    _perturb_b(model)
    ids = _ids()
    expected = _out(model, ids)
    model.cuda()
    layer = model.blocks[0].mlp.up
    assert layer.weight.is_cuda and layer.base_layer.quant_state.absmax.is_cuda
    assert (_out(model, ids.cuda()).cpu() - expected).abs().max() <= 1e-3


# ---- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (dict(rank=0), "rank: expected an integer >= 1, found 0"),
    (dict(dropout=1.0), "dropout: expected a number in"),
    (dict(targets=[]), "targets: expected at least one"),
    (dict(quant_block_size=100), "quant_block_size"),
])
def test_bad_config_values_are_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**bad).validate()


def test_targets_matching_nothing_list_the_available_layers():
    with pytest.raises(ValueError, match=r"targets \['query'\] match no linear layer; available: .*blocks\.0\.attn"):
        apply_lora(_model(), LoraConfig(targets=["query"]))
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(_model(tie_embeddings=False), LoraConfig(targets=["lm_head"]))
    with pytest.raises(ValueError, match="modules_to_save: no module 'scores'"):
        apply_lora(_model(), LoraConfig(modules_to_save=["scores"]))


def test_load_adapter_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_adapter(_model(), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="peft_type 'PREFIX_TUNING' is not supported; expected 'LORA'"):
        load_adapter(_model(), tmp_path)
    save_adapter(apply_lora(_model(), LoraConfig(rank=4)), tmp_path)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: tensor for .*lora_A.default.weight has "
                                         r"shape \(4, \d+\), expected \(8, \d+\)"):
        load_adapter(apply_lora(_model(), LoraConfig(rank=8)), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(PermissionError, match="pickle"):
        load_adapter(_model(), tmp_path)
    save_adapter(apply_lora(_model("gpt2-tiny"), LoraConfig(targets=["o"])), tmp_path)
    with pytest.raises(ValueError, match=r"module 'transformer.h.0.attn.c_proj' not found in this llama model"):
        load_adapter(_model(), tmp_path)
    with pytest.raises(ValueError, match="no adapter 'x' to save"):
        save_adapter(apply_lora(_model(), LoraConfig()), tmp_path, name="x")
