"""Quantized GGUF: Q8_0 / Q4_0 / Q4_1 blocks written from QuantLinear codes bit for bit (checked against the `gguf`
package's reference dequantizer), read back as the same codes, and run by real llama.cpp (the `xllamacpp` wheel)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_fixtures import stdlib_files
from torch import nn

import lmforge
from lmforge import cli
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.models import ModelConfig
from lmforge.models.gguf import load_gguf, load_gguf_quantized, save_gguf
from lmforge.models.gguf_blocks import BLOCK_TYPES, pack_blocks, unpack_blocks
from lmforge.models.transformer import Transformer
from lmforge.transforms.quant import (QuantLinear, dequantize_weight, prepare_quantized, quantization_config,
                                      quantize_rtn, quantize_weight, save_quantized, set_module)

gguf = pytest.importorskip("gguf", reason="the GGUF reference reader/writer (gguf extra)")
TYPES = [(name, bits, sym) for name, (bits, sym) in BLOCK_TYPES.items()]  # Q8_0, Q4_0, Q4_1


def _np(x: torch.Tensor | None) -> np.ndarray | None:
    return None if x is None else x.numpy()


# ---- blocks against gguf's reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,bits,symmetric", TYPES)
def test_packed_blocks_dequantize_like_ours_in_gguf_reference(name, bits, symmetric):
    w = torch.randn(8, 256) * torch.logspace(-3, 1, 8)[:, None]  # (out, in), rows of very different scales
    codes, scale, mn = quantize_weight(w, bits, 32, symmetric)
    raw = pack_blocks(name, _np(codes), _np(scale), _np(mn))
    assert raw.shape == (8, 256 // 32 * (2 + (0 if symmetric else 2) + 32 * bits // 8))
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(8, 256)
    assert torch.equal(torch.from_numpy(ref), dequantize_weight(codes, scale, mn, bits, symmetric))
    back = unpack_blocks(name, raw)
    assert all(torch.equal(torch.from_numpy(b), a) for a, b in zip((codes, scale, mn), back) if a is not None)
    assert (back[2] is None) == symmetric


@pytest.mark.parametrize("name,bits,symmetric", TYPES)
def test_unpack_inverts_gguf_own_quantizer(name, bits, symmetric):
    """Blocks made by gguf's own quantizer: our codes reproduce its bytes and its dequantized values."""
    w = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType[name])
    codes, scale, mn = unpack_blocks(name, raw)
    assert np.array_equal(pack_blocks(name, codes, scale, mn), raw)
    ours = dequantize_weight(torch.from_numpy(codes), torch.from_numpy(scale),
                             None if mn is None else torch.from_numpy(mn), bits, symmetric)
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])))


def test_pack_refuses_codes_of_the_wrong_layout():
    with pytest.raises(ValueError, match="Q8_0: codes must be int8"):
        pack_blocks("Q8_0", np.zeros((2, 32), np.uint8), np.zeros((2, 1), np.float16))
    with pytest.raises(ValueError, match=r"scale must have shape .* \(2, 2\)"):
        pack_blocks("Q4_0", np.zeros((2, 32), np.uint8), np.zeros((2, 1), np.float16))
    with pytest.raises(ValueError, match="a min is needed"):
        pack_blocks("Q4_1", np.zeros((2, 16), np.uint8), np.zeros((2, 1), np.float16))


# ---- a tiny Llama through GGUF -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe():
    """The stdlib byte-level BPE the engine tests use (engine_fixtures: 40 files, vocab 512), without its shards:
    a small vocabulary keeps GGUF metadata quick to parse."""
    from lmforge.tokenizer.train import train_tokenizer

    return train_tokenizer([f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()], kind="bpe",
                           vocab_size=512)


def _tiny(tok, seed: int = 0) -> Transformer:
    """A 2-block Llama (GQA, head_dim 16) on a real BPE vocabulary, initialised large enough that its greedy
    choices are decisive (embeddings N(0, 1), linears N(0, 0.2))."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, max_position_embeddings=256, eos_token_id=tok.eos_id)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 1.0 if n.startswith("embed") else 0.2)
    return model


def _dequantized(model: Transformer) -> Transformer:
    """The same model with every QuantLinear replaced by a float linear holding its dequantized weight."""
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(("weight_scale", "weight_min"))}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            sd[f"{name}.weight"] = m.dequantize()
    out = Transformer(model.cfg).eval()
    out.load_state_dict(sd)
    return out


@pytest.mark.parametrize("name,bits,symmetric", TYPES)
def test_quantized_gguf_round_trips_codes(name, bits, symmetric, bpe, tmp_path):
    model = quantize_rtn(_tiny(bpe), bits, 32, symmetric)
    path = save_gguf(model, bpe, tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{name}"]
    assert types["blk.1.attn_q.weight"] == types["blk.0.ffn_down.weight"] == name
    assert types["token_embd.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"

    cfg, sd, tok, qc = load_gguf_quantized(path)
    expected = model.state_dict()
    assert sorted(sd) == sorted(expected)
    for k, v in expected.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    assert qc == quantization_config(model)

    # the dequantizing reader sees exactly scale·q (+ min), q/k rows included
    _, floats, _ = load_gguf(path)
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(floats[f"{n}.weight"], m.dequantize()), n

    # what lmforge.load will do with it: empty QuantLinears from the config, then the codes
    with torch.device("meta"):
        rebuilt = Transformer(cfg)
    prepare_quantized(rebuilt, qc).load_state_dict(sd, assign=True)
    rebuilt.reset_rope()
    x = torch.tensor([tok.encode("def f(x): return x + 1")])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x).logits, model(x).logits)


@pytest.mark.parametrize("bits,group_size,symmetric", [(8, 32, False), (4, 64, True), (8, None, True)])
def test_settings_without_a_gguf_block_type_are_refused(bits, group_size, symmetric, bpe, tmp_path):
    model = quantize_rtn(_tiny(bpe), bits, group_size, symmetric)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q is quantized with .*Q8_0 \(bits=8, symmetric, "
                                         r"group_size=32\), Q4_0 .* Q4_1 \(bits=4, asymmetric"):
        save_gguf(model, bpe, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_mixed_block_types_keep_the_most_common(bpe, tmp_path):
    model = quantize_rtn(_tiny(bpe), 8, 32, True, modules=["attn.q"])
    quantize_rtn(model, 4, 32, True)  # the other 12 linears
    path = save_gguf(model, bpe, tmp_path / "mixed.gguf")
    assert gguf.GGUFReader(str(path)).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    _, sd, _, qc = load_gguf_quantized(path)
    assert qc["bits"] == 4 and qc["symmetric"] and len(qc["modules"]) == 12 and "blocks.0.attn.q" not in qc["modules"]
    assert torch.equal(sd["blocks.0.attn.q.weight"], model.blocks[0].attn.q.dequantize())  # Q8_0: dequantized
    assert torch.equal(sd["blocks.0.attn.k.weight"], model.blocks[0].attn.k.weight)  # Q4_0: codes


def test_convert_writes_a_quantized_folder_as_gguf(bpe, tmp_path, capsys):
    model = quantize_rtn(_tiny(bpe), 4, 32, False)
    src = save_quantized(model, bpe, tmp_path / "q4")
    assert cli.main(["convert", str(src), str(tmp_path / "q4.gguf")]) == 0
    _, sd, _, qc = load_gguf_quantized(tmp_path / "q4.gguf")
    assert qc["bits"] == 4 and not qc["symmetric"]
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_real_q4_1_file_keeps_its_block_linears_as_codes(smollm2_gguf):
    """The SmolLM2 package file: Q4_1 block linears, a Q8_0 embedding, F32 norms."""
    cfg, sd, _, qc = load_gguf_quantized(smollm2_gguf)
    assert (qc["bits"], qc["group_size"], qc["symmetric"], len(qc["modules"])) == (4, 32, False, 7 * cfg.num_layers)
    assert sd["embed.tokens.weight"].dtype == torch.float32 and sd["blocks.0.attn.q.weight_min"].dtype == torch.float16
    raw = {t.name: t for t in gguf.GGUFReader(str(smollm2_gguf)).tensors}
    for ours, theirs, heads in (("blocks.3.attn.q", "blk.3.attn_q", cfg.num_heads),
                                ("blocks.3.attn.k", "blk.3.attn_k", cfg.num_kv_heads),
                                ("blocks.29.mlp.down", "blk.29.ffn_down", 0)):
        t = raw[f"{theirs}.weight"]
        ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(-1, t.shape[0])
        if heads:  # llama.cpp's interleaved q/k rows -> ours
            ref = ref.reshape(heads, -1, 2, ref.shape[1]).transpose(1, 2).reshape(ref.shape)
        w = dequantize_weight(sd[f"{ours}.weight"], sd[f"{ours}.weight_scale"], sd[f"{ours}.weight_min"], 4, False)
        assert torch.equal(w, ref), ours


# ---- llama.cpp -------------------------------------------------------------------------------------------------

def llama_cpp(path: Path, n_ctx: int = 512, exact: bool = True):
    """benchmarks/common.py's `LlamaCppServer` (real llama.cpp from the xllamacpp wheel) on one GGUF file, 2 threads;
    `exact`: f32 KV cache and no flash attention."""
    pytest.importorskip("xllamacpp", reason="real llama.cpp comes from the xllamacpp wheel")
    common_py = Path(__file__).parents[2] / "benchmarks" / "common.py"
    spec = importlib.util.spec_from_file_location("bench_common", common_py)
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common.LlamaCppServer(path, n_ctx, threads=2, exact=exact)


class LlamaCppArithmetic(nn.Module):
    """A QuantLinear computed the way llama.cpp's CPU dot products compute it: each 32-wide block of the input is
    rounded to int8 with a float16 scale d = amax / 127 (block_q8_0; for Q4_1 weights block_q8_1, whose fp16
    block sum s = d·Σq carries the min term: y = Σ_b d_w·d_x·Σ q_w·q_x + m_w·s_x). Weights: our codes."""

    def __init__(self, q: QuantLinear):
        super().__init__()
        self.w = dequantize_weight(q.weight, q.weight_scale, None, q.bits, q.symmetric)  # (out, in): d·q
        self.m = None if q.symmetric else q.weight_min.float()  # (out, nb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.reshape(*x.shape[:-1], -1, 32)  # (..., nb, 32)
        d = xb.abs().amax(-1, keepdim=True) / 127
        q = torch.round(xb / torch.where(d == 0, torch.ones_like(d), d))
        y = (q * d.half().float()).reshape(x.shape) @ self.w.T
        if self.m is not None:
            y = y + (q.sum(-1) * d[..., 0]).half().float() @ self.m.T  # (..., nb) @ (nb, out)
        return y


def _llama_cpp_arithmetic(model: Transformer) -> Transformer:
    """A copy of the quantized model whose block linears compute as llama.cpp's CPU kernels do."""
    import copy

    out = copy.deepcopy(model)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            set_module(out, name, LlamaCppArithmetic(m))
    return out


def _greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by full forward passes (no cache): the plainest reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _logprobs(model: Transformer, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1)


def _same(ours: list[int], theirs: list[int]) -> bool:
    """Equal continuations, up to where the shorter one stopped (llama.cpp also stops at tokens named like an
    end of text, e.g. <|endoftext|>, which the engine only stops at when the config lists them)."""
    n = min(len(ours), len(theirs))
    return ours[:n] == theirs[:n]


def _near_tie_or_equal(model: Transformer, prompt: list[int], ours: list[int], theirs: list[int],
                       rel_tol: float) -> bool:
    """True when the continuations are equal, or at their first difference both tokens' logits (ours, on the
    common prefix) lie within rel_tol · std(logits) of each other: a near tie that llama.cpp's int8 rounding of
    activations may break the other way."""
    k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if k is None:
        return True
    with torch.no_grad():
        z = model(torch.tensor([prompt + ours[:k]])).logits[0, -1]
    return (z[ours[k]] - z[theirs[k]]).item() <= rel_tol * z.std().item()


PROMPTS = ["def main(args):", "The quick brown fox", "import numpy as np\n", "class Reader:\n    \"\"\"Read"]


@pytest.mark.parametrize("name,bits,symmetric", TYPES)
def test_llama_cpp_runs_our_blocks_exactly(name, bits, symmetric, bpe, tmp_path):
    """llama.cpp on our file = our codes under llama.cpp's own arithmetic (int8 activations): the same log-probs
    and the same greedy tokens; on the plainly dequantized weights, the engine's greedy tokens agree up to near
    ties that llama.cpp's activation rounding breaks differently."""
    model = quantize_rtn(_tiny(bpe), bits, 32, symmetric)
    llama = llama_cpp(save_gguf(model, bpe, tmp_path / f"tiny-{name}.gguf"), n_ctx=256)
    sim = _llama_cpp_arithmetic(model)
    prompts = [bpe.encode(p) for p in PROMPTS]
    compared = 0
    expected = [_greedy(sim, p, 16) for p in prompts]
    for p, want in zip(prompts, expected):
        theirs, ours = llama.top_logprobs(p), _logprobs(sim, p)
        assert all(abs(v - ours[t].item()) < 1e-3 for t, v in theirs.items()), (p, theirs)
        compared += bool(theirs)
        assert llama.greedy(p, 16) == want
    assert compared >= 2

    ref = _dequantized(model)
    engine = [o.token_ids for o in Engine(ref).generate(prompts, SamplingParams(max_new_tokens=16))]
    theirs = [llama.greedy(p, 16) for p in prompts]
    assert all(_near_tie_or_equal(ref, p, a, b, 0.05) for p, a, b in zip(prompts, engine, theirs)), (engine, theirs)

    # the same check catches a file whose q rows are out of llama.cpp's order
    q = model.blocks[0].attn.q
    for t in (q.weight, q.weight_scale) + (() if symmetric else (q.weight_min,)):
        t.copy_(t.flip(0))
    wrong = llama_cpp(save_gguf(model, bpe, tmp_path / "wrong.gguf"), n_ctx=256)
    assert sum(wrong.greedy(p, 16) != want for p, want in zip(prompts, expected)) >= 2


# ---- the real SmolLM2-135M-Instruct ---------------------------------------------------------------------------

def _docstring_prompts(n: int) -> list[str]:
    """First lines of docstrings (modules, classes, functions) of held-out standard-library modules."""
    import ast

    from lmforge.data.stdlib import stdlib_heldout_texts

    lines = []
    for _, source in stdlib_heldout_texts(20):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                first = ast.get_docstring(node).strip().splitlines()[0].strip()
                if len(first) >= 20 and first not in lines:
                    lines.append(first)
    assert len(lines) >= n, f"only {len(lines)} docstring prompts"
    return lines[:n]


@pytest.mark.slow
def test_smollm2_q8_0_greedy_in_llama_cpp_equals_ours(tmp_path):
    """Q8_0 from RTN int8 g32 codes, 50 held-out docstring prompts, 32 greedy tokens against lmforge in float32 on
    the dequantized weights. llama.cpp's Q8_0 kernels round activations to int8, which breaks near ties: so the
    same weights written as F32 are the control (≥ 48/50 equal), our Q8_0 file must match lmforge as often as it
    matches that F32 file in llama.cpp itself, and token by token along llama.cpp's text ≥ 95% agree."""
    model, tok = lmforge.load("smollm2-135m-instruct")
    quantize_rtn(model, 8, 32, True)
    ref = _dequantized(model)
    prompts = [tok.encode(p) for p in _docstring_prompts(50)]
    ours = [o.token_ids for o in Engine(ref).generate(prompts, SamplingParams(max_new_tokens=32))]
    llama = llama_cpp(save_gguf(model, tok, tmp_path / "q8_0.gguf"))
    q8 = [llama.greedy(p, 32) for p in prompts]
    del llama
    control = llama_cpp(save_gguf(ref, tok, tmp_path / "dequantized-f32.gguf"))
    f32 = [control.greedy(p, 32) for p in prompts]
    q8_ours, f32_ours, q8_f32 = (sum(_same(a, b) for a, b in zip(x, y))
                                 for x, y in ((q8, ours), (f32, ours), (q8, f32)))
    agree = total = 0
    for p, t in zip(prompts, q8):  # lmforge's argmax along llama.cpp's own continuation
        with torch.no_grad():
            agree += (ref(torch.tensor([p + t])).logits[0, len(p) - 1:-1].argmax(-1) == torch.tensor(t)).sum().item()
        total += len(t)
    print(f"\nSmolLM2 RTN int8 g32, 50 prompts x 32 greedy tokens equal: llama.cpp Q8_0 (ours) vs lmforge {q8_ours}/50;"
          f" llama.cpp F32 of the same weights vs lmforge {f32_ours}/50; llama.cpp Q8_0 vs llama.cpp F32 {q8_f32}/50; "
          f"lmforge's next token = llama.cpp Q8_0's along its text at {agree}/{total} ({100 * agree / total:.1f}%)")
    assert f32_ours >= 48 and q8_ours >= q8_f32 - 2 and agree >= 0.95 * total


def _teacher_forced(llama, ids: list[int]) -> list[int]:
    """llama.cpp's greedy next token after every prefix ids[:1], ..., ids[:T-1] (its KV cache reused)."""
    return [llama.complete(ids[:t], 1, cache_prompt=True)["tokens"][0] for t in range(1, len(ids))]


@pytest.mark.slow
def test_smollm2_q4_0_next_token_argmax_agrees_with_llama_cpp(tmp_path, smollm2_gguf):
    """Q4_0 from RTN int4 g32 symmetric codes (f16 embedding): llama.cpp's next-token argmax after every prefix of
    held-out stdlib text equals lmforge's on ≥ 95% of positions; then llama.cpp's decode speed on this file and on
    the package's own Q4_1 file."""
    from lmforge.data.stdlib import stdlib_heldout_texts

    model, tok = lmforge.load("smollm2-135m-instruct")
    quantize_rtn(model, 4, 32, True)
    path = save_gguf(model, tok, tmp_path / "smol-q4_0.gguf", "f16")
    model.embed.tokens.weight.data = model.embed.tokens.weight.data.half().float()  # the file's f16 embedding/output
    ref = _dequantized(model)
    llama = llama_cpp(path)
    same = total = 0
    for _, text in stdlib_heldout_texts(4):
        ids = tok.encode(text)[:192]
        theirs = torch.tensor(_teacher_forced(llama, ids))
        with torch.no_grad():
            same += (ref(torch.tensor([ids])).logits[0, :-1].argmax(-1) == theirs).sum().item()
        total += len(ids) - 1
    print(f"\nSmolLM2 RTN int4 g32 -> Q4_0, llama.cpp next-token argmax equal to lmforge's at {same}/{total} "
          f"positions of held-out text ({100 * same / total:.1f}%)")
    assert same >= 0.95 * total

    prompt = tok.encode(_docstring_prompts(1)[0])
    speed = {}
    for label, gguf_path in (("our Q4_0", path), ("package Q4_1", smollm2_gguf)):
        server = llama_cpp(gguf_path, exact=False)  # llama.cpp's defaults: f16 KV cache, flash attention auto
        server.complete(prompt, 8, ignore_eos=True)  # warm-up
        speed[label] = max(server.complete(prompt, 128, ignore_eos=True)["timings"]["predicted_per_second"]
                           for _ in range(3))
        del server
    print("llama.cpp decode, 2 threads, 128 tokens, best of 3: " +
          ", ".join(f"{k} {v:.1f} tokens/s" for k, v in speed.items()))
    assert min(speed.values()) > 0
