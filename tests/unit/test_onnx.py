"""ONNX export with a KV cache, run in ONNX Runtime: logits against lmforge's own forward pass (prefill, then decode
steps feeding the presents back), greedy tokens against the engine, ORT's int8 / int4 quantizers, sampling against
`inference.sampling`, and the runner importing without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'lmforge[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'lmforge[onnx]')")

import onnx
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from lmforge.errors import InputError
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.inference.onnx_runner import OnnxGenerator, distribution
from lmforge.models import ModelConfig, Transformer
from lmforge.models.onnx import export_onnx, quantize_onnx
from lmforge.tokenizer import Tokenizer

VOCAB = 96
ROOT = Path(__file__).resolve().parents[2]


def _tokenizer() -> Tokenizer:
    backend = Backend(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend=backend, eos_token="t1")


def _model(**kw) -> Transformer:
    """A tiny GQA decoder whose greedy outputs vary (wide init), so equality checks mean something."""
    torch.manual_seed(0)
    base = {"vocab_size": VOCAB, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
            "intermediate_size": 128, "max_position_embeddings": 128, "initializer_range": 0.2, "eos_token_id": 1}
    return Transformer(ModelConfig(**{**base, **kw})).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, folder) of a tied-embedding Llama exported once for the module."""
    model = _model()
    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    export_onnx(model, _tokenizer(), folder)
    return model, folder


def _session(folder: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _run(sess, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]):
    names = [i.name for i in sess.get_inputs()]
    logits, *present = sess.run(None, dict(zip(names, [ids, mask, pos, *past])))
    return logits, present


def _decode_against_reference(model: Transformer, folder: Path, prompt: torch.Tensor, steps: int) -> float:
    """Prefill `prompt` (B, T) with P = 0, then `steps` greedy decode steps feeding presents back; max |Δ logits|
    against full forward passes of lmforge over the whole sequence so far (no cache)."""
    sess = _session(folder)
    cfg = model.cfg
    b, t = prompt.shape
    past = [np.zeros((b, cfg.num_kv_heads, 0, cfg.head_dim), np.float32) for _ in range(2 * cfg.num_layers)]
    seq = prompt.clone()
    step_ids, pos = prompt.numpy(), np.broadcast_to(np.arange(t), (b, t)).copy()
    worst = 0.0
    for step in range(steps + 1):
        logits, past = _run(sess, step_ids, np.ones((b, seq.shape[1]), np.int64), pos, past)
        with torch.no_grad():
            ref = model(seq).logits[:, -logits.shape[1]:].numpy()  # (B, T or 1, V)
        assert logits.shape == ref.shape and past[0].shape[2] == seq.shape[1]
        worst = max(worst, float(np.abs(logits - ref).max()))
        nxt = torch.from_numpy(logits[:, -1].argmax(-1))[:, None]  # (B, 1)
        seq = torch.cat([seq, nxt], 1)
        step_ids, pos = nxt.numpy(), np.full((b, 1), seq.shape[1] - 1)
    return worst


def test_folder_has_graph_tokenizer_config_and_runner_metadata(exported):
    _, folder = exported
    meta = json.loads((folder / "lmforge_onnx.json").read_text())
    assert (meta["num_layers"], meta["num_kv_heads"], meta["head_dim"]) == (2, 2, 16)
    assert meta["eos_token_ids"] == [1] and meta["dtype"] == "float32"
    graph = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(graph)
    inputs = [i.name for i in graph.graph.input]
    assert inputs[:3] == ["input_ids", "attention_mask", "position_ids"] and inputs[3] == "past_key_values.0.key"
    assert [o.name for o in graph.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    linears = [n.name for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in
               {t.name for t in graph.graph.initializer}]
    assert linears == [f"blocks.{i}.{m}" for i in range(2) for m in
                       ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")] + ["lm_head"]
    assert Tokenizer.from_dir(folder).encode("t5 t7") == [5, 7]
    assert json.loads((folder / "config.json").read_text())["num_key_value_heads"] == 2


def test_prefill_then_16_decode_steps_match_lmforge_logits(exported):
    model, folder = exported
    prompt = torch.randint(0, VOCAB, (2, 11))
    assert _decode_against_reference(model, folder, prompt, 16) <= 1e-4


@pytest.mark.parametrize("family", [
    {"family": "qwen2", "qkv_bias": True, "sliding_window": 6, "tie_embeddings": False},  # past the window
    {"family": "gpt2", "position": "learned", "norm": "layernorm", "mlp": "plain", "activation": "gelu_tanh",
     "qkv_bias": True, "out_bias": True, "mlp_bias": True, "norm_bias": True, "num_kv_heads": 4}])
def test_other_decoder_families_match_lmforge_logits(tmp_path, family):
    model = _model(**family)
    export_onnx(model, _tokenizer(), tmp_path / "m")
    assert _decode_against_reference(model, tmp_path / "m", torch.randint(0, VOCAB, (1, 9)), 8) <= 1e-4


def test_left_padded_batch_equals_each_row_alone(exported):
    model, folder = exported
    sess = _session(folder)
    cfg = model.cfg
    short, long = [5, 9, 2, 30], [7, 8, 11, 12, 40, 41, 3]

    def prefill(rows: list[list[int]], pad_to: int):
        ids = np.array([[0] * (pad_to - len(r)) + r for r in rows])
        mask = np.array([[0] * (pad_to - len(r)) + [1] * len(r) for r in rows])
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        past = [np.zeros((len(rows), cfg.num_kv_heads, 0, cfg.head_dim), np.float32) for _ in range(4)]
        return _run(sess, ids, mask, pos, past)[0][:, -1]

    batched = prefill([short, long], len(long))
    np.testing.assert_allclose(batched[0], prefill([short], len(short))[0], atol=1e-4)
    np.testing.assert_allclose(batched[1], prefill([long], len(long))[0], atol=1e-4)


def test_runner_greedy_tokens_equal_the_engine(exported):
    model, folder = exported
    prompt = [5, 17, 33, 2, 8, 64, 12]
    engine = Engine(model, _tokenizer()).generate([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True))
    ours = OnnxGenerator(folder).generate(prompt, 24, ignore_eos=True)
    assert ours == engine[0].token_ids and len(set(ours)) > 3


def test_runner_stops_at_eos_and_streams_text(exported):
    _, folder = exported
    gen = OnnxGenerator(folder)
    free = gen.generate([5, 17, 33], 40, ignore_eos=True)
    pieces = list(gen.stream_text("t5 t17 t33", 40, stop_token_ids=[free[3]], ignore_eos=True))
    assert [p.token_id for p in pieces] == free[:4]
    assert "".join(p.text for p in pieces).split() == [f"t{i}" for i in free[:4]]
    with_eos = gen.generate([5, 17, 33], 40, stop_token_ids=[])  # eos (t1) ends it only if it comes
    assert with_eos == free[:len(with_eos)] and (with_eos[-1] == 1 or len(with_eos) == 40)


def test_sampling_distribution_equals_the_engine_sampler():
    from lmforge.inference.sampling import processed_logprobs

    logits = np.random.default_rng(0).normal(0, 2, 50)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 8, 0.5)]:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        ref = processed_logprobs(torch.tensor(logits)[None], [params])[0].exp().numpy()
        ours = distribution(logits, temperature, top_k, top_p)
        np.testing.assert_allclose(ours, ref, atol=1e-6)
        assert (ours > 0).sum() == (ref > 0).sum()


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(exported):
    _, folder = exported
    gen = OnnxGenerator(folder)
    prompt = [5, 17, 33, 2]
    a = gen.generate(prompt, 20, temperature=1.5, seed=3, ignore_eos=True)
    assert a == gen.generate(prompt, 20, temperature=1.5, seed=3, ignore_eos=True)
    assert a != gen.generate(prompt, 20, temperature=1.5, seed=4, ignore_eos=True)
    assert gen.generate(prompt, 20, temperature=1.5, top_k=1, seed=3, ignore_eos=True) == gen.generate(
        prompt, 20, ignore_eos=True)


def _quantized_vs_float_weights(qfolder: Path, ffolder: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(float weight (K, N), dequantized weight (K, N), |scale| per element (K, N)) of every quantized MatMul,
    decoded by hand from ORT's layouts: MatMulInteger int8 (K, N) codes with a scale per column; MatMulNBits
    uint8 (N, K/32, 16) two 4-bit codes per byte (low nibble first), value = (code - 8) * scale[n, block]."""
    from onnx import numpy_helper

    q, f = onnx.load(str(qfolder / "model.onnx")), onnx.load(str(ffolder / "model.onnx"))
    qi = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    fi = {t.name: numpy_helper.to_array(t) for t in f.graph.initializer}
    out = []
    for node in q.graph.node:
        if node.op_type == "MatMulInteger":
            name = node.input[1].removesuffix("_quantized")
            codes, scale = qi[node.input[1]].astype(np.float64), np.abs(qi[name + "_scale"])  # (K, N), (N,)
            assert not qi[name + "_zero_point"].any()
            out.append((fi[name], codes * scale, np.broadcast_to(scale, codes.shape)))
        elif node.op_type == "MatMulNBits":
            name = node.input[1].removesuffix("_Q4")
            packed, scales = qi[node.input[1]], qi[node.input[2]]  # (N, K/32, 16) uint8, (N, K/32)
            n = packed.shape[0]
            codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1).astype(np.float64) - 8  # (N, K)
            scale = np.repeat(scales, 32, axis=1)  # (N, K)
            out.append((fi[name], (codes * scale).T, np.abs(scale).T))
    return out


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    _, folder = exported
    root = tmp_path_factory.mktemp("quantized")
    return {kind: quantize_onnx(folder, root / kind, kind=kind, block_size=32).parent for kind in ("int8", "int4")}


def test_quantizers_cover_every_projection_and_the_lm_head_with_round_to_nearest_codes(exported, quantized):
    _, folder = exported
    for kind, qfolder in quantized.items():
        assert json.loads((qfolder / "lmforge_onnx.json").read_text())["quantization"]["kind"] == kind
        weights = _quantized_vs_float_weights(qfolder, folder)
        # q/k/v/o/gate/up/down of both blocks and the LM head (untied at export, so a constant MatMul weight)
        assert sorted(w.shape for w, _, _ in weights) == sorted([(64, 64)] * 4 + [(64, 32)] * 4 + [(64, 128)] * 4
                                                                 + [(128, 64)] * 2 + [(64, VOCAB)])
        for w, deq, scale in weights:
            err = np.abs(deq - w)
            assert (err <= scale * 1.0001).all() and err.mean() <= 0.3 * scale.mean() and err.max() > 0


@pytest.mark.parametrize("kind,op", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_excluded_layers_stay_float(exported, tmp_path, kind, op):
    _, folder = exported
    quantize_onnx(folder, tmp_path / kind, kind=kind, exclude=["*.mlp.down", "lm_head"])
    graph = onnx.load(str(tmp_path / kind / "model.onnx"))
    assert sum(n.op_type == op for n in graph.graph.node) == 12
    kept = {n.name for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in
            {t.name for t in graph.graph.initializer}}
    assert kept == {"blocks.0.mlp.down", "blocks.1.mlp.down", "lm_head"}
    assert json.loads((tmp_path / kind / "lmforge_onnx.json").read_text())["quantization"]["exclude"] == [
        "*.mlp.down", "lm_head"]
    with pytest.raises(InputError, match="matches no linear layer"):
        quantize_onnx(folder, tmp_path / "typo", kind=kind, exclude=["*.mlp.dwn"])


def test_quantized_graphs_generate_and_int4_errs_more_than_int8(exported, quantized):
    _, folder = exported
    prompt = [5, 17, 33, 2, 8, 64, 12]
    feed = (np.array([prompt]), np.ones((1, 7), np.int64), np.arange(7)[None],
            [np.zeros((1, 2, 0, 16), np.float32)] * 4)
    reference = _run(_session(folder), *feed)[0]
    errors = {}
    for kind, qfolder in quantized.items():
        assert len(OnnxGenerator(qfolder).generate(prompt, 16, ignore_eos=True)) == 16
        errors[kind] = np.abs(_run(_session(qfolder), *feed)[0] - reference).mean() / np.abs(reference).mean()
    assert 0 < errors["int8"] < errors["int4"], errors


def test_external_weights_run_and_quantize(exported, tmp_path):
    model, folder = exported
    prompt = [5, 17, 33, 2, 8]
    expected = OnnxGenerator(folder).generate(prompt, 12, ignore_eos=True)
    export_onnx(model, _tokenizer(), tmp_path / "ext", external_data=True)
    assert (tmp_path / "ext" / "model.onnx.data").stat().st_size > (tmp_path / "ext" / "model.onnx").stat().st_size
    assert OnnxGenerator(tmp_path / "ext").generate(prompt, 12, ignore_eos=True) == expected
    quantize_onnx(tmp_path / "ext", tmp_path / "ext4", kind="int4")
    assert (tmp_path / "ext4" / "model.onnx.data").exists()
    assert len(OnnxGenerator(tmp_path / "ext4").generate(prompt, 12, ignore_eos=True)) == 12


def test_float16_graph_runs_close_to_float32_and_int8_refuses_it(exported, tmp_path):
    model, folder = exported
    prompt = [5, 17, 33, 2, 8]
    export_onnx(model, _tokenizer(), tmp_path / "f16", dtype="float16")
    feed = (np.array([prompt]), np.ones((1, 5), np.int64), np.arange(5)[None])
    half = _run(_session(tmp_path / "f16"), *feed, [np.zeros((1, 2, 0, 16), np.float16)] * 4)[0]
    full = _run(_session(folder), *feed, [np.zeros((1, 2, 0, 16), np.float32)] * 4)[0]
    assert half.dtype == np.float32 and 0 < np.abs(half - full).max() < 0.02 * np.abs(full).max()
    with pytest.raises(InputError, match="int8 .* needs a float32 graph"):
        quantize_onnx(tmp_path / "f16", tmp_path / "f16-int8", kind="int8")


def test_runner_imports_and_generates_without_torch(exported):
    _, folder = exported
    expected = OnnxGenerator(folder).generate([5, 17, 33], 10, ignore_eos=True)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lmforge.inference.onnx_runner import OnnxGenerator\n"
            f"print(OnnxGenerator({str(folder)!r}).generate([5, 17, 33], 10, ignore_eos=True))\n"
            "assert sys.modules['torch'] is None and not any(m.startswith('torch.') for m in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(expected)


def test_bad_inputs_give_one_line_errors(exported, tmp_path):
    model, folder = exported
    encoder = Transformer(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4, causal=False,
                                      head="mlm", family="bert", norm="layernorm", position="learned"))
    with pytest.raises(InputError, match="causal language models"):
        export_onnx(encoder, _tokenizer(), tmp_path / "e")
    with pytest.raises(InputError, match="dtype"):
        export_onnx(model, _tokenizer(), tmp_path / "d", dtype="int8")
    with pytest.raises(InputError, match="expected 'int8' or 'int4'"):
        quantize_onnx(folder, tmp_path / "q", kind="int3")
    with pytest.raises(InputError, match="expected a folder from export_onnx"):
        quantize_onnx(tmp_path, tmp_path / "q")
    with pytest.raises(InputError, match="lmforge_onnx.json"):
        OnnxGenerator(tmp_path)
    gen = OnnxGenerator(folder)
    with pytest.raises(InputError, match=r"token ids must be in \[0, 96\)"):
        gen.generate([5, 500], 4)
    with pytest.raises(ValueError, match="top_p must be in"):
        gen.generate([5], 4, temperature=1.0, top_p=0.0)
    assert not (tmp_path / "e").exists() and not (tmp_path / "q").exists()


@pytest.mark.slow
def test_smollm2_fp32_export_matches_lmforge_prefill_and_16_decode_steps(smollm2, tmp_path):
    model, tok = smollm2
    export_onnx(model, tok, tmp_path / "smol")
    text = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg " * 6
    prompt = torch.tensor([tok.encode(text)[:64]])
    assert prompt.shape[1] == 64
    worst = _decode_against_reference(model, tmp_path / "smol", prompt, 16)
    print(f"SmolLM2-135M fp32: max |dlogits| ORT vs lmforge over prefill (64) + 16 decode steps = {worst:.2e}")
    assert worst <= 1e-4
