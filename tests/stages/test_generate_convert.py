"""`lmforge generate` and `lmforge convert` end to end on a tiny model with the real GPT-2 tokenizer."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge import cli
from lmforge.inference.engine import Engine, SamplingParams
from lmforge.models import ModelConfig, Transformer
from lmforge.tokenizer import encode_chat


@pytest.fixture
def tiny_dir(tmp_path, gpt2_tokenizer):
    cfg = ModelConfig(vocab_size=gpt2_tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=64, max_position_embeddings=128,
                      eos_token_id=gpt2_tokenizer.eos_id)
    model = Transformer(cfg).eval()
    return lmforge.save(model, gpt2_tokenizer, tmp_path / "tiny")


def test_generate_prints_the_library_output(tiny_dir, capsys):
    model, tok = lmforge.load(tiny_dir)
    expected = _generate(model, [tok.encode("def main():")], SamplingParams(max_new_tokens=6))[0]
    stops = {tok.eos_id}
    text = tok.decode([t for t in expected if t not in stops])
    assert cli.main(["generate", "--model", str(tiny_dir), "--prompt", "def main():", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_generate_chat_uses_the_template(tiny_dir, capsys):
    model, tok = lmforge.load(tiny_dir)
    ids = encode_chat(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                      add_generation_prompt=True).ids
    out = _generate(model, [ids], SamplingParams(max_new_tokens=4, stop_token_ids=(tok.eos_id,)))[0]
    text = tok.decode([t for t in out if t != tok.eos_id])
    argv = ["generate", "--model", str(tiny_dir), "--chat", "--system", "Be brief.", "--prompt", "Hi",
            "max_new_tokens=4"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == text + "\n"


def test_generate_seed_reproducible(tiny_dir, capsys):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "x", "--max-new-tokens", "8", "--temperature", "1.0",
            "--seed", "3"]
    cli.main(argv)
    first = capsys.readouterr().out
    cli.main(argv)
    assert capsys.readouterr().out == first


def test_generate_rejects_invalid_values(tiny_dir, capsys):
    assert cli.main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "temperature" in err and "-1" in err
    assert cli.main(["generate", "--model", str(tiny_dir), "--prompt", "x", "--max-new-token", "3"]) == 2
    assert "did you mean 'max_new_tokens'" in capsys.readouterr().err


def test_convert_to_bf16_folder(tiny_dir, tmp_path, capsys):
    dst = tmp_path / "bf16"
    assert cli.main(["convert", str(tiny_dir), str(dst), "--dtype", "bfloat16"]) == 0
    model, tok = lmforge.load(dst)
    ref, _ = lmforge.load(tiny_dir)
    assert next(model.parameters()).dtype == torch.bfloat16
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b.to(torch.bfloat16)), k
    assert tok.encode("hello world") == lmforge.load(tiny_dir)[1].encode("hello world")
    assert str(dst) in capsys.readouterr().out


def test_convert_gguf_to_hf_folder(smollm2_gguf, smollm2, tmp_path):
    dst = tmp_path / "smol"
    assert cli.main(["convert", str(smollm2_gguf), str(dst)]) == 0
    model, tok = lmforge.load(dst)
    ours, _ = smollm2
    assert (dst / "config.json").exists() and (dst / "tokenizer_config.json").exists()
    assert tok.chat_template and all(torch.equal(a, b) for a, b in
                                     zip(model.state_dict().values(), ours.state_dict().values()))


def test_convert_to_gguf_round_trips_and_loads_in_transformers(smollm2, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference (dev extra)")
    ours, tok = smollm2
    src = lmforge.save(ours, tok, tmp_path / "hf")
    dst = tmp_path / "smol-f32.gguf"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    back, tok2 = lmforge.load(dst)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=dst.name).eval()
    x = torch.tensor([tok.encode("Numbers 12345 and words.")])
    assert tok2.encode("Numbers 12345 and words.") == x[0].tolist() and tok2.chat_template == tok.chat_template
    with torch.no_grad():
        mine = ours(x).logits
        assert (back(x).logits - mine).abs().max().item() <= 1e-5
        assert (ref(x).logits - mine).abs().max().item() <= 1e-4


def _generate(model, prompts, params):
    """New token ids per prompt through the engine (stop tokens included when hit)."""
    return [o.token_ids for o in Engine(model).generate(prompts, params)]
