"""`lmforge.load` / `lmforge.save`: pickle opt-in, clear errors, head replacement, bit-exact round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.errors import InputError
from lmforge.models import hf as hfmap
from lmforge.models.transformer import Transformer

V = 128
# minimal Hugging Face config.json dicts, one per family / head
HF_CONFIGS = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 64, "tie_word_embeddings": False},
    "llama-tied-llama3": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": V,
                          "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "intermediate_size": 128, "tie_word_embeddings": True,
                          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8}},
    "llama-classifier": {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"],
                         "vocab_size": V, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 128, "pad_token_id": 0,
                         "id2label": {"0": "neg", "1": "neu", "2": "pos"}},
    "mistral": {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": V,
                "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
                "intermediate_size": 128, "sliding_window": 4},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": V, "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128},
    "gpt2": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V, "n_embd": 64,
             "n_layer": 2, "n_head": 4, "n_positions": 32},
    "bert-pretraining": {"model_type": "bert", "architectures": ["BertForPreTraining"], "vocab_size": V,
                         "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "intermediate_size": 128, "max_position_embeddings": 32, "type_vocab_size": 2},
    "bert-regression": {"model_type": "bert", "architectures": ["BertForSequenceClassification"],
                        "vocab_size": V, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 128, "max_position_embeddings": 32, "num_labels": 1},
}


def _model(name: str = "llama", seed: int = 0) -> Transformer:
    """A tiny model with every parameter moved off its init (biases non-zero, norms not one)."""
    torch.manual_seed(seed)
    model = Transformer(hfmap.config_from_hf(json.loads(json.dumps(HF_CONFIGS[name])))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(seed))


def _assert_same_weights(a: Transformer, b: Transformer, dtype: torch.dtype | None = None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        want = sa[k].to(dtype) if dtype else sa[k]
        assert sb[k].dtype == want.dtype, f"{k}: dtype {sb[k].dtype}, expected {want.dtype}"
        assert torch.equal(sb[k], want), f"{k} changed in the round trip"


def _assert_same_outputs(a: torch.Tensor, b: torch.Tensor) -> None:
    # identical weights; CPU kernels may still sum in another order when a tensor's address alignment differs
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ---- pickle checkpoints -------------------------------------------------------------------------------------


def _pickle_checkpoint(tmp_path: Path) -> tuple[Transformer, Path]:
    model = _model("llama")
    folder = lmforge.save(model, None, tmp_path / "pickled")
    sd = load_file(str(folder / "model.safetensors"))
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return model, folder


def test_pickle_checkpoint_is_refused_without_opt_in(tmp_path: Path) -> None:
    _, folder = _pickle_checkpoint(tmp_path)
    with pytest.raises(PermissionError) as e:
        lmforge.load(folder)
    msg = str(e.value)
    assert str(folder / "pytorch_model.bin") in msg and "allow_pickle=True" in msg


def test_pickle_checkpoint_loads_with_opt_in(tmp_path: Path) -> None:
    model, folder = _pickle_checkpoint(tmp_path)
    loaded, _ = lmforge.load(folder, allow_pickle=True)
    _assert_same_weights(model, loaded)
    with torch.no_grad():
        _assert_same_outputs(loaded(_ids()).logits, model(_ids()).logits)


class _NotAWeight:
    def __reduce__(self):  # harmless stand-in for a code-running pickle
        return (os.getcwd, ())


def test_pickle_with_arbitrary_objects_is_refused_even_with_opt_in(tmp_path: Path) -> None:
    _, folder = _pickle_checkpoint(tmp_path)
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({**sd, "payload": _NotAWeight()}, folder / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"pytorch_model.bin: refused: it holds a non-tensor object \(GLOBAL "):
        lmforge.load(folder, allow_pickle=True)


# ---- clear errors -------------------------------------------------------------------------------------------


def test_unsupported_model_type_names_file_and_supported_list(tmp_path: Path) -> None:
    folder = lmforge.save(_model(), None, tmp_path / "m")
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, "model_type": "t5"}))
    with pytest.raises(ValueError) as e:
        lmforge.load(folder)
    msg = str(e.value)
    assert str(folder / "config.json") in msg and "'t5'" in msg
    assert all(f in msg for f in ("llama", "mistral", "qwen2", "gpt2", "bert"))


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    folder = lmforge.save(_model(), None, tmp_path / "m")
    (folder / "config.json").write_text('{\n  "model_type": "llama",\n  "vocab_size": 128,,\n  "x": 1\n}\n')
    with pytest.raises(ValueError) as e:
        lmforge.load(folder)
    msg = str(e.value)
    assert str(folder / "config.json") in msg and "line 3" in msg


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_missing_path_lists_what_was_expected(where: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = str(tmp_path / "no" / "such-model") if where == "absolute" else "no/such/model"  # not owner/name
    with pytest.raises(FileNotFoundError) as e:
        lmforge.load(source)
    msg = str(e.value)
    assert source in msg
    for expected in ("Hugging Face folder", ".gguf", "hub id", "smollm2-135m-instruct"):
        assert expected in msg, f"{expected!r} not in {msg!r}"


def test_folder_without_config_says_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lmforge.load(tmp_path / "empty")


def _rewrite_weights(folder: Path, edit) -> None:
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_wrong_shape_names_weight_and_both_shapes(tmp_path: Path) -> None:
    folder = lmforge.save(_model(), None, tmp_path / "m")
    _rewrite_weights(folder, lambda sd: sd.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(ValueError) as e:
        lmforge.load(folder)
    msg = str(e.value)
    assert "blocks.1.attn.q.weight" in msg or "model.layers.1.self_attn.q_proj.weight" in msg, msg
    assert "(32, 64)" in msg and "(64, 64)" in msg and str(folder) in msg


def test_unknown_weight_is_named(tmp_path: Path) -> None:
    folder = lmforge.save(_model(), None, tmp_path / "m")
    _rewrite_weights(folder, lambda sd: sd.update({"model.layers.0.self_attn.rotary.scale": torch.zeros(4)}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.rotary\.scale"):
        lmforge.load(folder)


def test_missing_body_weight_is_named(tmp_path: Path) -> None:
    folder = lmforge.save(_model(), None, tmp_path / "m")
    _rewrite_weights(folder, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weights.*blocks\.1\.mlp\.up\.weight"):
        lmforge.load(folder)


# ---- head replacement ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert-pretraining"])
def test_classifier_head_on_a_pretrained_body(name: str, tmp_path: Path) -> None:
    base = _model(name)
    folder = lmforge.save(base, None, tmp_path / "m")
    clf, _ = lmforge.load(folder, head="classifier", num_labels=3)
    assert clf.cfg.head == "classifier" and clf.cfg.num_labels == 3
    head_prefixes = ("lm_head.", "mlm.", "nsp.", "score.")
    body = {k: v for k, v in base.state_dict().items() if not k.startswith(head_prefixes)}
    got = clf.state_dict()
    assert not any(k.startswith(("lm_head.", "mlm.", "nsp.")) for k in got)
    for k, v in body.items():
        assert torch.equal(got[k], v), f"body weight {k} differs from the checkpoint"
    w = clf.score.weight
    assert w.shape == (3, 64) and torch.isfinite(w).all() and w.abs().sum() > 0
    assert 0.5 * clf.cfg.initializer_range < w.std() < 2 * clf.cfg.initializer_range  # fresh init, not garbage
    with torch.no_grad():
        logits = clf(_ids(), attention_mask=torch.ones(2, 10, dtype=torch.long)).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


# ---- save / load round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_round_trip_is_bit_exact_fp32(name: str, tmp_path: Path) -> None:
    model = _model(name)
    folder = lmforge.save(model, None, tmp_path / "m")
    loaded, _ = lmforge.load(folder)
    want = model.cfg.to_dict()
    if want["head"] == "classifier" and want["id2label"] is None:  # exported with transformers' default names
        want["id2label"] = {i: f"LABEL_{i}" for i in range(want["num_labels"])}
    assert loaded.cfg.to_dict() == want
    _assert_same_weights(model, loaded)
    ids = _ids()
    kw = {"token_type_ids": torch.ones_like(ids)} if model.cfg.family == "bert" else {}
    with torch.no_grad():
        a, b = model(ids, **kw), loaded(ids, **kw)
    _assert_same_outputs(a.logits, b.logits)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert-pretraining"])
def test_round_trip_bf16(name: str, tmp_path: Path) -> None:
    model = _model(name)
    folder = lmforge.save(model, None, tmp_path / "m", dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(folder / "model.safetensors")).values())
    assert next(model.parameters()).dtype == torch.float32  # saving does not cast the model itself
    loaded, _ = lmforge.load(folder)
    _assert_same_weights(model, loaded, torch.bfloat16)
    as_fp32, _ = lmforge.load(folder, dtype=torch.float32)
    _assert_same_weights(loaded, as_fp32, torch.float32)


def test_save_over_a_sharded_folder_leaves_no_stale_shards(tmp_path: Path) -> None:
    model = _model("llama")
    folder = lmforge.save(model, None, tmp_path / "m", max_shard_bytes=40_000)
    assert (folder / "model.safetensors.index.json").exists()
    lmforge.save(model, None, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json",
                                                        "model.safetensors"]
    _assert_same_weights(model, lmforge.load(folder)[0])
