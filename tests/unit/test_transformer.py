"""The one model file: KV cache, masks, heads, presets."""

from __future__ import annotations

import pytest
import torch

from lmforge.models import DenseKVCache, ModelConfig, Transformer


def test_incremental_decoding_matches_full_forward(tiny_llama_cfg):
    model = Transformer(tiny_llama_cfg).eval()
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        full = model(x).logits  # (2, 12, V)
        cache = DenseKVCache(tiny_llama_cfg, 2, 12)
        parts = [model(x[:, :5], cache=cache).logits]
        parts += [model(x[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_sliding_window_limits_attention():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                      sliding_window=3)
    model = Transformer(cfg).eval()
    x = torch.randint(0, 50, (1, 10))
    y = x.clone()
    y[0, 0] = (x[0, 0] + 1) % 50  # outside the window of the last position
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert torch.allclose(a[0, -1], b[0, -1]) and not torch.allclose(a[0, 1], b[0, 1])


def test_encoder_is_bidirectional_and_decoder_causal():
    for causal in (True, False):
        cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                          causal=causal, head="none")
        model = Transformer(cfg).eval()
        x = torch.randint(0, 50, (1, 6))
        y = x.clone()
        y[0, -1] = (x[0, -1] + 1) % 50
        with torch.no_grad():
            changed = not torch.allclose(model(x).hidden[0, 0], model(y).hidden[0, 0])
        assert changed == (not causal)


def test_scalar_head_pools_last_real_token(tiny_llama_cfg):
    tiny_llama_cfg.head, tiny_llama_cfg.num_labels = "classifier", 1
    model = Transformer(tiny_llama_cfg).eval()
    x = torch.randint(1, 96, (1, 6))
    padded = torch.cat([x, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        a = model(x).logits
        b = model(padded, attention_mask=mask).logits
        per_token = model.score_tokens(model(x).hidden)
    assert a.shape == (1, 1) and torch.allclose(a, b, atol=1e-6)
    assert per_token.shape == (1, 6, 1) and torch.allclose(per_token[0, -1], a[0], atol=1e-6)


def test_parameter_count_without_weights(tiny_llama_cfg):
    c, f, v, layers = 32, 64, 96, 2
    per_block = c * 8 * (4 + 2 + 2) + c * c + 3 * c * f + 2 * c  # q,k,v (GQA), o, gated MLP, two norms
    assert tiny_llama_cfg.num_parameters() == layers * per_block + v * c + c
    assert Transformer(tiny_llama_cfg).num_parameters() == tiny_llama_cfg.num_parameters()


def test_bad_head_configuration_is_rejected():
    with pytest.raises(ValueError, match="not a multiple"):
        ModelConfig(num_heads=6, num_kv_heads=4, hidden_size=48)


def test_presets_build_and_match_known_sizes():
    from lmforge.models.presets import PRESETS, preset

    for name in PRESETS:
        assert preset(name).num_parameters() > 0
    # published sizes: SmolLM2-135M has 134.5M parameters, GPT-2 small 124.4M
    assert round(preset("smollm2-135m").num_parameters() / 1e5) == 1345
    assert round(preset("gpt2-124m").num_parameters() / 1e5) == 1244
    with pytest.raises(ValueError, match="did you mean 'llama-10m'"):
        preset("llama-10n")


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_linear_cross_entropy_matches_logits_path(tied, tiny_llama_cfg):
    import torch.nn.functional as F

    tiny_llama_cfg.tie_embeddings = tied
    model = Transformer(tiny_llama_cfg)
    x = torch.randint(0, 96, (3, 10))
    labels = torch.randint(0, 96, (3, 10))
    labels[0, :4] = -100
    ref = F.cross_entropy(model(x).logits.reshape(-1, 96), labels.reshape(-1), ignore_index=-100, reduction="sum")
    ref.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = model(x, labels=labels)
    out.extra["loss_sum"].backward()
    assert torch.allclose(out.extra["loss_sum"], ref, atol=1e-4) and out.extra["loss_tokens"] == 26
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-5), n


def test_activation_checkpointing_gives_the_same_gradients(tiny_llama_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_llama_cfg)
    x = torch.randint(0, 96, (2, 12))
    grads = []
    for ac in (False, True):
        model.zero_grad()
        model.activation_checkpointing = ac
        model(x, labels=x).extra["loss_sum"].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.slow
def test_compiled_blocks_match_eager(tiny_llama_cfg):
    model = Transformer(tiny_llama_cfg).eval()
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        eager = model(x).logits
        for block in model.blocks:
            block.compile()
        compiled = model(x).logits
    assert torch.allclose(eager, compiled, atol=1e-5)
    assert set(model.state_dict()) == set(Transformer(tiny_llama_cfg).state_dict())  # names unchanged

