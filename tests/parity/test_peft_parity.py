"""LoRA adapters against `peft`, both directions, in fp32 on tiny random `transformers` models (and SmolLM2).

ours -> peft: `apply_lora` + `save_adapter`, then `peft.PeftModel.from_pretrained` on the transformers model.
peft -> ours: `get_peft_model` + `save_pretrained`, then our `load_adapter`.
lora_B (zero at init) and trained heads are randomised first, so a dropped or misplaced tensor shows in the logits.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lmforge  # noqa: E402
from lmforge.transforms import LoraConfig, LoRALinear, apply_lora, load_adapter, save_adapter  # noqa: E402

transformers.utils.logging.disable_progress_bar()

TOL = 1e-4
V = 128
_LLAMA = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False)
_GPT2 = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32)
_BERT = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=32, num_labels=3)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _GPT2),
    "bert-cls": ("BertConfig", "BertForSequenceClassification", _BERT),
}
# targets on our side, and the peft LoraConfig for the other direction
OURS = {"llama": LoraConfig(rank=4, alpha=8.0),
        "gpt2": LoraConfig(rank=4, alpha=8.0, targets=["o", "up", "down"]),
        "bert-cls": LoraConfig(rank=4, alpha=8.0)}
THEIRS = {"llama": dict(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"]),
          "gpt2": dict(task_type="CAUSAL_LM", target_modules=["c_proj", "c_fc"], fan_in_fan_out=True),
          "bert-cls": dict(task_type="SEQ_CLS", target_modules=["query", "value", "dense"])}  # dense: pooler too


def _make(arch: str, folder):
    """Write a random transformers model of `arch` to `folder`; return a function giving a fresh copy of it."""
    conf_cls, model_cls, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    getattr(transformers, model_cls)(getattr(transformers, conf_cls)(**kwargs)).save_pretrained(folder)
    return lambda: getattr(transformers, model_cls).from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def pair(request, tmp_path_factory):
    """(arch, folder of a random transformers model, a function giving a fresh transformers model)."""
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, _make(request.param, folder)


def _ours(folder):
    model, _ = lmforge.load(folder)
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _randomise(params) -> None:
    with torch.no_grad():
        for p in params:
            p.normal_(0.0, 0.2)


def test_our_adapter_loads_in_peft(pair, tmp_path):
    arch, folder, fresh = pair
    ours = _ours(folder)
    ids = _ids()
    base = _logits(ours, ids)
    apply_lora(ours, OURS[arch])
    _randomise(p for n, p in ours.named_parameters() if "lora_B" in n or n.startswith("score."))
    mine = _logits(ours, ids)
    assert (mine - base).abs().max() > 1e-2, "the adapter does not change the output: the test would be vacuous"
    save_adapter(ours, tmp_path, base_model_name_or_path=str(folder))
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path).eval()
    n_ours = sum(isinstance(m, LoRALinear) for m in ours.modules())
    n_theirs = sum(hasattr(m, "lora_A") for m in theirs.modules())
    assert n_theirs == n_ours, f"peft wrapped {n_theirs} layers from target_modules {conf['target_modules']}, " \
                               f"we have {n_ours}"
    diff = (_logits(theirs, ids) - mine).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff}"


def test_peft_adapter_loads_in_ours(pair, tmp_path):
    arch, folder, fresh = pair
    theirs = peft.get_peft_model(fresh(), peft.LoraConfig(r=4, lora_alpha=8, **THEIRS[arch])).eval()
    _randomise(p for n, p in theirs.named_parameters() if "lora_B" in n or "modules_to_save" in n)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(_ours(folder), tmp_path)
    ids = _ids()
    n_theirs = sum(hasattr(m, "lora_A") for m in theirs.modules())
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == n_theirs
    assert not any(p.requires_grad for p in ours.parameters()), "trainable=False must freeze everything"
    diff = (_logits(ours, ids) - _logits(theirs, ids)).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff}"


def test_bert_target_modules_are_unambiguous(tmp_path):
    """BERT's 'dense' names four different layers; the saved target_modules must select exactly ours."""
    _make("bert-cls", tmp_path / "base")
    ours = apply_lora(_ours(tmp_path / "base"), LoraConfig(targets=["o", "down"]))
    save_adapter(ours, tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["task_type"] == "SEQ_CLS" and conf["modules_to_save"] == ["classifier"]
    assert "dense" not in conf["target_modules"], conf["target_modules"]


def test_gpt2_fused_qkv_cannot_be_saved(tmp_path):
    _make("gpt2", tmp_path / "base")
    ours = apply_lora(_ours(tmp_path / "base"), LoraConfig(targets=["q", "o"]))
    with pytest.raises(ValueError, match="c_attn"):
        save_adapter(ours, tmp_path)


def test_smollm2_adapter_loads_in_peft(smollm2, tmp_path):
    """A real checkpoint: our adapter on SmolLM2-135M, applied by peft to the transformers model. The transformers
    model is read from our export (1 s; reading the GGUF takes 15 s), whose logits test_real_checkpoints.py
    checks against transformers' own GGUF import."""
    import copy

    ours = copy.deepcopy(smollm2[0])
    lmforge.save(ours, None, tmp_path / "base")
    ids = torch.tensor([smollm2[1].encode("The capital of France is")])
    apply_lora(ours, LoraConfig(rank=8, alpha=16.0, targets=["q", "v", "down"]))
    torch.manual_seed(0)
    _randomise(p for n, p in ours.named_parameters() if "lora_B" in n)
    for p in (p for n, p in ours.named_parameters() if "lora_B" in n):
        p.data.mul_(0.05)  # a small update on a real model, as after fine-tuning
    mine = _logits(ours, ids)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    assert (mine - _logits(smollm2[0], ids)).abs().max() > 1e-2
    diff = (_logits(theirs, ids) - mine).abs().max().item()
    assert diff <= TOL, f"max abs logit diff {diff}"
