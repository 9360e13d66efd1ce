"""Parity with `transformers` on tiny random configs, in both directions, in fp32.

(a) import: a model written by `save_pretrained` loads with `lmforge.load` and gives the same outputs;
(b) export: a model written by `lmforge.save` loads with the matching `transformers` class (no missing or
unexpected keys) and gives the same outputs. Decoders are compared on unpadded input and on left-padded input
with identical explicit position_ids (real positions only); encoders on right-padded input with token types.
Every assertion message carries the measured max abs diff.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmforge  # noqa: E402
from lmforge.models import hf as hfmap  # noqa: E402
from lmforge.models.transformer import Transformer  # noqa: E402

transformers.utils.logging.disable_progress_bar()

TOL = 1e-4
V, B, T = 128, 2, 12
PAD = 0  # pad id written at padded positions; real tokens are drawn from 1..V-1

_DEC = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=64, rms_norm_eps=1e-6)
_GPT2 = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32)
_BERT = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=32, type_vocab_size=2)
_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8}  # short original window: all 3 bands used
_LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}


@dataclass
class Case:
    id: str
    config_cls: str
    model_cls: str
    kwargs: dict[str, Any]
    output: str  # lm | hidden | classifier | mlm | pretraining | span
    head: str  # our head name for this architecture
    encoder: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("llama-causal", "LlamaConfig", "LlamaForCausalLM", dict(_DEC, tie_word_embeddings=False), "lm", "lm"),
    Case("llama-causal-tied", "LlamaConfig", "LlamaForCausalLM", dict(_DEC, tie_word_embeddings=True), "lm", "lm"),
    Case("llama-rope-llama3", "LlamaConfig", "LlamaForCausalLM", dict(_DEC, rope_parameters=_LLAMA3), "lm", "lm"),
    Case("llama-rope-linear", "LlamaConfig", "LlamaForCausalLM", dict(_DEC, rope_parameters=_LINEAR), "lm", "lm"),
    Case("llama-bias-head-dim", "LlamaConfig", "LlamaForCausalLM",
         dict(_DEC, attention_bias=True, mlp_bias=True, head_dim=32), "lm", "lm"),
    Case("llama-model", "LlamaConfig", "LlamaModel", dict(_DEC), "hidden", "none"),
    Case("llama-classifier", "LlamaConfig", "LlamaForSequenceClassification",
         dict(_DEC, pad_token_id=PAD, num_labels=3), "classifier", "classifier"),
    Case("mistral-sliding", "MistralConfig", "MistralForCausalLM", dict(_DEC, sliding_window=4), "lm", "lm"),
    Case("qwen2-causal", "Qwen2Config", "Qwen2ForCausalLM", dict(_DEC), "lm", "lm"),
    Case("gpt2-lmhead", "GPT2Config", "GPT2LMHeadModel", dict(_GPT2), "lm", "lm"),
    Case("gpt2-model", "GPT2Config", "GPT2Model", dict(_GPT2), "hidden", "none"),
    Case("bert-model", "BertConfig", "BertModel", dict(_BERT), "hidden", "none", encoder=True),
    Case("bert-mlm", "BertConfig", "BertForMaskedLM", dict(_BERT), "mlm", "mlm", encoder=True),
    Case("bert-pretraining", "BertConfig", "BertForPreTraining", dict(_BERT), "pretraining", "pretraining",
         encoder=True),
    Case("bert-classifier", "BertConfig", "BertForSequenceClassification", dict(_BERT, num_labels=3),
         "classifier", "classifier", encoder=True),
    Case("bert-regression", "BertConfig", "BertForSequenceClassification", dict(_BERT, num_labels=1),
         "classifier", "classifier", encoder=True),
    Case("bert-span", "BertConfig", "BertForQuestionAnswering", dict(_BERT), "span", "span", encoder=True),
    Case("llama-span", "LlamaConfig", "LlamaForQuestionAnswering", dict(_DEC, pad_token_id=PAD), "span", "span"),
    Case("mistral-span", "MistralConfig", "MistralForQuestionAnswering", dict(_DEC, pad_token_id=PAD), "span",
         "span"),
    Case("qwen2-span", "Qwen2Config", "Qwen2ForQuestionAnswering", dict(_DEC, pad_token_id=PAD), "span", "span"),
    Case("gpt2-span", "GPT2Config", "GPT2ForQuestionAnswering", dict(_GPT2), "span", "span"),
]


def _hf_model(case: Case, seed: int = 0):
    torch.manual_seed(seed)
    cfg = getattr(transformers, case.config_cls)(**case.kwargs)
    model = getattr(transformers, case.model_cls)(cfg).eval()
    _perturb(model, seed + 100)
    return model


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init (zero biases, unit norms) so a misplaced or dropped weight shows."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # tied parameters appear once and stay tied
        p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _variants(case: Case) -> list[tuple[str, dict[str, torch.Tensor], torch.Tensor]]:
    """(name, forward kwargs shared by both models, real-token mask (B, T))."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (B, T), generator=g)
    full = torch.ones(B, T, dtype=torch.long)
    out = []
    if case.encoder:
        tt = torch.zeros(B, T, dtype=torch.long)
        tt[:, T // 2:] = 1
        out.append(("plain", dict(input_ids=ids, token_type_ids=tt), full.bool()))
        mask = full.clone()
        mask[1, -5:] = 0  # right padding
        ids_r, tt_r = ids.masked_fill(mask == 0, PAD), tt.masked_fill(mask == 0, 0)
        out.append(("right-padded", dict(input_ids=ids_r, attention_mask=mask, token_type_ids=tt_r), mask.bool()))
        return out
    out.append(("plain", dict(input_ids=ids), full.bool()))
    pads = {"left-padded": (slice(None, 5),)}
    if case.output == "classifier":
        pads["right-padded"] = (slice(-5, None),)
    for name, (cols,) in pads.items():
        mask = full.clone()
        mask[1, cols] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # same explicit positions for both models
        out.append((name, dict(input_ids=ids.masked_fill(mask == 0, PAD), attention_mask=mask, position_ids=pos),
                    mask.bool()))
    return out


@torch.no_grad()
def _max_diff(case: Case, theirs, ours: Transformer) -> dict[str, float]:
    """Run both models on every input variant; max abs diff per (variant, output)."""
    diffs = {}
    for name, kw, real in _variants(case):
        t = theirs(**kw)
        o = ours(**kw)
        if case.output in ("lm", "mlm"):
            pairs = [("logits", t.logits, o.logits, True)]
        elif case.output == "hidden":
            pairs = [("hidden", t.last_hidden_state, o.hidden, True)]
            if case.encoder:
                pairs.append(("pooler", t.pooler_output, ours.pool(o.hidden, kw.get("attention_mask"),
                                                                   kw["input_ids"]), False))
        elif case.output == "classifier":
            pairs = [("logits", t.logits, o.logits, False)]
        elif case.output == "span":  # ours (B, T, 2): start, end
            pairs = [("start", t.start_logits, o.logits[..., 0], True), ("end", t.end_logits, o.logits[..., 1], True)]
        else:
            pairs = [("logits", t.prediction_logits, o.logits, True),
                     ("nsp", t.seq_relationship_logits, o.nsp_logits, False)]
        for what, a, b, per_token in pairs:
            assert b is not None and a.shape == b.shape, f"{case.id} {name} {what}: shapes {a.shape} vs " \
                                                           f"{None if b is None else b.shape}"
            d = (a - b).abs()
            diffs[f"{name}/{what}"] = (d[real] if per_token else d).max().item()
    return diffs


def _check(diffs: dict[str, float], label: str) -> None:
    worst = max(diffs.values())
    msg = f"{label}: max abs diff {worst:.3e} > {TOL} ({', '.join(f'{k}={v:.2e}' for k, v in diffs.items())})"
    assert worst <= TOL, msg
    print(f"{label}: max abs diff {worst:.2e}")


def _hf_load(case: Case, path: Path):
    cls = getattr(transformers, case.model_cls)
    model, info = cls.from_pretrained(path, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], f"{case.model_cls}.from_pretrained({path}): {kind} = {sorted(info[kind])}"
    return model.float().eval()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_import_from_transformers(case: Case, tmp_path: Path) -> None:
    theirs = _hf_model(case)
    theirs.save_pretrained(tmp_path)
    ours, tok = lmforge.load(tmp_path)
    assert tok is None
    assert ours.cfg.head == case.head and ours.cfg.family == theirs.config.model_type
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    _check(_max_diff(case, theirs, ours), f"import {case.id}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_export_to_transformers(case: Case, tmp_path: Path) -> None:
    _hf_model(case).save_pretrained(tmp_path / "ref")
    cfg = hfmap.config_from_hf(hfmap.read_config(tmp_path / "ref" / "config.json"))
    torch.manual_seed(1)
    ours = Transformer(cfg).eval()
    _perturb(ours, 7)
    out = lmforge.save(ours, None, tmp_path / "ours")
    conf = json.loads((out / "config.json").read_text())
    assert conf["architectures"][0] == case.model_cls
    assert (out / "generation_config.json").exists()
    theirs = _hf_load(case, out)
    _check(_max_diff(case, theirs, ours), f"export {case.id}")


def test_sharded_export_loads_in_both(tmp_path: Path) -> None:
    case = CASES[0]  # llama, untied: 8 KiB..32 KiB per tensor
    theirs = _hf_model(case)
    theirs.save_pretrained(tmp_path / "ref")
    ours, _ = lmforge.load(tmp_path / "ref")
    out = lmforge.save(ours, None, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert all(s.stat().st_size <= 40_000 + 1024 for s in shards)  # + safetensors header
    again, _ = lmforge.load(out)
    sd, sd2 = ours.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    _check(_max_diff(case, _hf_load(case, out), again), "sharded export")


def test_sharded_transformers_checkpoint_imports(tmp_path: Path) -> None:
    case = CASES[0]
    theirs = _hf_model(case)
    theirs.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, _ = lmforge.load(tmp_path)
    _check(_max_diff(case, theirs, ours), "sharded import")


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("qwen2-causal", "mistral-sliding", "gpt2-lmhead",
                                                                 "llama-causal", "bert-mlm")],
                         ids=lambda c: c.id)
def test_import_without_tie_key_uses_transformers_default(case: Case, tmp_path: Path) -> None:
    """A config.json without tie_word_embeddings means the class default, as in transformers."""
    theirs = _hf_model(case)
    theirs.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.pop("tie_word_embeddings", None)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    reloaded = _hf_load(case, tmp_path)
    ours, _ = lmforge.load(tmp_path)
    assert ours.cfg.tie_embeddings == reloaded.config.tie_word_embeddings
    _check(_max_diff(case, reloaded, ours), f"import {case.id} without tie_word_embeddings")


@pytest.mark.parametrize("case_id, change", [
    ("llama-rope-llama3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    ("llama-rope-linear", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    ("mistral-sliding", {"sliding_window": None}),
])
def test_parity_inputs_exercise_the_feature(case_id: str, change: dict[str, Any], tmp_path: Path) -> None:
    """Without the feature, transformers' outputs move well past TOL: the parity above would catch its loss."""
    case = next(c for c in CASES if c.id == case_id)
    theirs = _hf_model(case)
    theirs.save_pretrained(tmp_path)
    ours, _ = lmforge.load(tmp_path)
    plain = getattr(transformers, case.model_cls)(getattr(transformers, case.config_cls)(**{**case.kwargs, **change}))
    plain.load_state_dict(theirs.state_dict())
    diffs = _max_diff(case, plain.eval(), ours)
    assert min(diffs.values()) > 100 * TOL, diffs


@pytest.mark.parametrize("case_id, legacy", [
    ("llama-rope-llama3", {"rope_theta": 10000.0,
                           "rope_scaling": {k: v for k, v in _LLAMA3.items() if k != "rope_theta"}}),
    ("llama-rope-linear", {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
])
def test_import_legacy_rope_scaling_config(case_id: str, legacy: dict[str, Any], tmp_path: Path) -> None:
    """config.json files on the hub (transformers 4.x) carry top-level rope_theta and a rope_scaling dict."""
    case = next(c for c in CASES if c.id == case_id)
    theirs = _hf_model(case)
    theirs.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps({**conf, **legacy}))
    reloaded = _hf_load(case, tmp_path)
    assert reloaded.config.rope_parameters["rope_type"] == case.kwargs["rope_parameters"]["rope_type"]
    ours, _ = lmforge.load(tmp_path)
    _check(_max_diff(case, reloaded, ours), f"import {case.id} (legacy rope_scaling)")
    _check(_max_diff(case, theirs, ours), f"import {case.id} (legacy rope_scaling) vs original")


@pytest.mark.parametrize("case_id", ["llama-causal", "qwen2-causal", "mistral-sliding", "gpt2-lmhead"])
def test_engine_greedy_equals_transformers_generate(case_id: str, tmp_path: Path) -> None:
    """Prompts of very different lengths decoded together by the engine (paged cache, continuous batching,
    chunked prefill) give, each, the tokens of `transformers`' greedy `generate` run on that prompt alone."""
    from lmforge.inference.engine import Engine, EngineConfig, SamplingParams

    case = next(c for c in CASES if c.id == case_id)
    theirs = _hf_model(case)
    with torch.no_grad():  # a wider spread of logits: greedy paths that vary from token to token
        for p in theirs.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    theirs.save_pretrained(tmp_path)
    ours, _ = lmforge.load(tmp_path)
    g = torch.Generator().manual_seed(2)
    ctx = 32 if case_id.startswith("gpt2") else 64
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in (1, 5, ctx - 14, 11)]
    engine = Engine(ours, config=EngineConfig(block_size=4, max_batch_tokens=16))
    got = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))]
    theirs.generation_config.eos_token_id = None  # like ignore_eos (min_new_tokens would forbid the eos token)
    for prompt, mine in zip(prompts, got):
        ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert mine == ref, f"{case_id}: prompt of {len(prompt)} tokens"
    assert len({tuple(x) for x in got}) > 1


def test_span_loss_equals_transformers_and_ignores_padding(tmp_path: Path) -> None:
    """The span loss (objectives/span.py) equals BertForQuestionAnswering's own loss on the same weights and
    unpadded inputs, and a padded batch gives each window the loss it has alone (transformers' includes the pads)."""
    from lmforge.objectives.span import SpanExtraction

    case = next(c for c in CASES if c.id == "bert-span")
    theirs = _hf_model(case)
    theirs.save_pretrained(tmp_path / "qa")
    ours, _ = lmforge.load(tmp_path / "qa")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (B, T), generator=g)
    starts, ends = torch.tensor([2, 5]), torch.tensor([4, 9])
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, T, dtype=torch.long), "start_positions": starts,
             "end_positions": ends}
    with torch.no_grad():
        ref = theirs(input_ids=ids, start_positions=starts, end_positions=ends).loss
        loss, metrics = SpanExtraction()(ours.eval(), batch)
    assert abs(loss.item() - ref.item()) <= TOL, (loss.item(), ref.item())
    padded = dict(batch, attention_mask=batch["attention_mask"].clone())
    padded["attention_mask"][1, 10:] = 0
    padded["input_ids"] = ids.masked_fill(padded["attention_mask"] == 0, PAD)
    with torch.no_grad():
        both, _ = SpanExtraction()(ours, padded)
        alone = [SpanExtraction()(ours, {"input_ids": ids[i:i + 1, :n], "attention_mask": torch.ones(1, n).long(),
                                         "start_positions": starts[i:i + 1], "end_positions": ends[i:i + 1]})[0]
                 for i, n in ((0, T), (1, 10))]
    assert abs(both.item() - sum(a.item() for a in alone) / 2) <= TOL
