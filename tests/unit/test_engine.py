"""The inference engine: paged KV cache, continuous batching, sampling, stops, log-probs, speculative decoding,
LoRA per request, prompt tuning, encoders. References are full forward passes of the same model (no cache)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from lmforge.inference.engine import AdapterNotFound, Engine, EngineConfig, RequestError, SamplingParams
from lmforge.inference.paged import PagedKVCache
from lmforge.models import ModelConfig, Transformer

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


def _model(vocab: int = 96, ctx: int = 128, **kw) -> Transformer:
    """A tiny decoder whose greedy outputs vary (untied head, wide init), so equality checks mean something; its
    widths are multiples of 16, so decode steps run through the native step (inference/native) unless a test
    turns it off."""
    cfg = ModelConfig(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=ctx, tie_embeddings=False,
                      initializer_range=0.2, **kw)
    return Transformer(cfg).eval()


@torch.no_grad()
def _reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes over the whole sequence (no cache at all)."""
    x = list(prompt)
    for _ in range(n):
        x.append(int(model(torch.tensor([x])).logits[0, -1].argmax()))
    return x[len(prompt):]


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3], [40, 41, 42], list(range(1, 70))]


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_batch_of_very_different_lengths_equals_each_solo_run_and_the_reference(native):
    model = _model()
    assert len({tuple(_reference(model, p, 12)) for p in PROMPTS}) == len(PROMPTS)
    for cfg in (EngineConfig(block_size=4, native_decode=native),
                EngineConfig(block_size=16, max_batch_tokens=7, native_decode=native)):  # chunked prefill
        engine = Engine(model, config=cfg)
        assert (engine.decode_path == "native") == native, engine.decode_path
        batched = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
        assert batched == [_reference(model, p, 12) for p in PROMPTS]
        assert batched == [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]


def test_requests_join_and_leave_a_running_batch():
    model = _model()
    engine = Engine(model, config=EngineConfig(block_size=4))
    long = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=20, ignore_eos=True))
    outs: dict[str, list[int]] = {long: []}
    finished_at = {}
    for step in range(40):
        if step == 3:  # arrives while the first one is decoding, finishes long before it
            short = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=3, ignore_eos=True))
            outs[short] = []
        for o in engine.step():
            outs[o.request_id] += o.token_ids
            if o.finished:
                finished_at[o.request_id] = step
        if not engine.has_unfinished():
            break
    assert finished_at[short] < finished_at[long]  # the short request never waits for the long one
    assert outs[long] == _reference(model, PROMPTS[0], 20) and outs[short] == _reference(model, PROMPTS[2], 3)


def test_blocks_return_to_the_pool_after_completion_and_after_abort():
    engine = Engine(_model(), config=EngineConfig(block_size=4, prefix_caching=False))
    engine.generate(PROMPTS, GREEDY)
    assert engine.stats()["kv_blocks_used"] == 0
    rid = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats()["kv_blocks_used"] == math.ceil((len(PROMPTS[3]) + 1) / 4)
    engine.abort(rid)
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "abort" and not engine.has_unfinished()


def test_prefix_sharing_gives_identical_outputs_with_fewer_blocks():
    model = _model()
    shared = list(range(10, 58))  # 48 tokens = 12 blocks of 4
    prompts = [shared + [1, 2], shared + [3], shared + [4, 5, 6]]
    used = {}
    outputs = {}
    for caching in (False, True):
        engine = Engine(model, config=EngineConfig(block_size=4, prefix_caching=caching))
        engine.add_request(prompts[0], GREEDY)
        engine.step()  # the first request's prompt is cached; the others arrive and share it
        ids = [engine.add_request(p, GREEDY) for p in prompts[1:]]
        got: dict[str, list[int]] = {}
        for step in range(100):
            for o in engine.step():
                got.setdefault(o.request_id, []).extend(o.token_ids)
            if step == 0:
                used[caching] = engine.stats()["kv_blocks_used"]
            if not engine.has_unfinished():
                break
        outputs[caching] = [got[i] for i in ids]
        if caching:
            assert engine.stats()["prefix_cache_hit_tokens"] == 2 * 48
    assert outputs[True] == outputs[False] == [_reference(model, p, 12) for p in prompts[1:]]
    assert used[True] <= used[False] - 2 * 12


@pytest.mark.parametrize("blocks", [18, 20, 40])
def test_preemption_when_blocks_run_out_keeps_outputs_exact(blocks):
    """4 x (29 + 40) tokens need 72 blocks of 4; with fewer, sequences are preempted and recomputed. A waiting
    request holds no blocks (20 once deadlocked: two preempted requests each held half the pool by prefix)."""
    model = _model()
    per_block = PagedKVCache.bytes_per_token(model.cfg, torch.float32) * 4  # a block of 4 tokens
    engine = Engine(model, config=EngineConfig(block_size=4, kv_cache_gb=blocks * per_block / 2**30))
    prompts = [list(range(i + 1, i + 30)) for i in range(4)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    out: dict[str, list[int]] = {i: [] for i in ids}
    for _ in range(1000):  # bounded: a scheduler that cannot progress fails here instead of hanging
        if not engine.has_unfinished():
            break
        for o in engine.step():
            out[o.request_id] += o.token_ids
    assert [out[i] for i in ids] == [_reference(model, p, 40) for p in prompts]
    assert engine.stats()["kv_blocks_used"] == 0


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it():
    engine = Engine(_model())
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    a = engine.generate([[1, 2, 3]], p)[0].token_ids
    b = engine.generate([[9, 9], [1, 2, 3], [4]], [SamplingParams(max_new_tokens=5, temperature=1.0), p, p])[1]
    c = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=10, temperature=1.0, seed=8))[0].token_ids
    assert a == b.token_ids and a != c


def test_top_k_and_top_p_restrict_the_support():
    engine = Engine(_model())
    model = engine.model
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits[0, -1]
    top3 = set(logits.topk(3).indices.tolist())
    outs = engine.generate([[1, 2, 3]] * 40, [SamplingParams(max_new_tokens=1, temperature=2.0, top_k=3, seed=i)
                                              for i in range(40)])
    assert {o.token_ids[0] for o in outs} <= top3
    probs = logits.softmax(-1)
    top1 = int(probs.argmax())
    outs = engine.generate([[1, 2, 3]] * 20, [SamplingParams(max_new_tokens=1, temperature=1.0, seed=i,
                                                             top_p=float(probs.max()) * 0.99) for i in range(20)])
    assert {o.token_ids[0] for o in outs} == {top1}  # top_p below the top token's mass keeps only it


def test_stop_tokens_stop_strings_and_lengths(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = _model(vocab=tok.vocab_size)
    engine = Engine(model, tok)
    prompt = tok.encode("def main():")
    free = engine.generate([prompt], GREEDY)[0]
    assert free.finish_reason == "length" and free.completion_tokens == 12
    assert free.text == tok.decode(free.token_ids)
    stop_tok = engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                        stop_token_ids=(free.token_ids[3],)))[0]
    assert stop_tok.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[3]) + 1]
    assert stop_tok.finish_reason == "stop"
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    cut = engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    streamed = []
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)))
    while engine.has_unfinished():
        streamed += [o.text for o in engine.step() if o.request_id == rid]
    assert "".join(streamed) == cut.text  # streamed pieces never show part of the stop string


def test_logprobs_are_the_models_log_softmax():
    model = _model()
    engine = Engine(model)
    out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=3))[0]
    seq = [1, 2, 3] + out.token_ids
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0].log_softmax(-1)  # (T, V)
    for i, lp in enumerate(out.logprobs):
        row = ref[2 + i]
        assert lp.token_id == out.token_ids[i]
        assert abs(lp.logprob - row[lp.token_id].item()) < 1e-4
        assert [t for t, _ in lp.top] == row.topk(3).indices.tolist()


def test_penalties_match_transformers_repetition_penalty():
    transformers = pytest.importorskip("transformers")
    model = _model()
    prompt = [5, 6, 7, 5, 6, 7]
    ours = Engine(model).generate([prompt], SamplingParams(max_new_tokens=10, ignore_eos=True,
                                                           repetition_penalty=1.3))[0].token_ids
    proc = transformers.RepetitionPenaltyLogitsProcessor(1.3)
    x = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(10):
            scores = proc(x, model(x).logits[:, -1])
            x = torch.cat([x, scores.argmax(-1, keepdim=True)], 1)
    assert ours == x[0, len(prompt):].tolist()


def test_bad_requests_are_refused_with_clear_messages():
    engine = Engine(_model(ctx=64))
    with pytest.raises(RequestError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(10\) = 70 exceeds the "
                                           r"context length 64"):
        engine.add_request([1] * 60, SamplingParams(max_new_tokens=10))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(RequestError, match="temperature"):
        engine.add_request([1], SamplingParams(temperature=-1))
    with pytest.raises(RequestError, match=r"\[0, 96\)"):
        engine.add_request([500], SamplingParams(max_new_tokens=4))
    with pytest.raises(AdapterNotFound, match="nope"):
        engine.add_request([1], SamplingParams(max_new_tokens=4), adapter="nope")
    with pytest.raises(RequestError, match="tokenizer"):
        engine.add_request([1], SamplingParams(max_new_tokens=4, stop=("x",)))


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_speculative_greedy_is_identical_to_plain_decoding(kind, native):
    model = _model()
    draft = _model() if kind == "draft" else None
    if draft is not None:  # a draft that agrees often but not always: the target's weights plus noise
        draft.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in draft.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    prompts = PROMPTS + [[7, 8, 9, 7, 8, 9, 7, 8]]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    engine = Engine(model, config=EngineConfig(block_size=4, speculative=kind, num_speculative_tokens=3,
                                               native_decode=native), draft=draft)
    outs = [o.token_ids for o in engine.generate(prompts, params)]
    assert outs == [_reference(model, p, 24) for p in prompts]
    s = engine.stats()
    assert s["draft_tokens_total"] > 0 and 0 < s["draft_tokens_accepted"] and s["kv_blocks_used"] == 0
    if kind == "draft":
        assert s["draft_tokens_accepted"] < s["draft_tokens_total"]  # rejections happened and were repaired


def _exact_marginals(model: Transformer, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Exact distributions of each of the first `steps` sampled tokens (temperature 1), by enumeration."""
    paths = {tuple(prompt): 1.0}
    marginals = []
    for _ in range(steps):
        nxt: dict[tuple[int, ...], float] = {}
        m = torch.zeros(model.cfg.vocab_size, dtype=torch.float64)
        with torch.no_grad():
            for path, pr in paths.items():
                probs = model(torch.tensor([path])).logits[0, -1].double().softmax(-1)
                m += pr * probs
                for t, q in enumerate(probs.tolist()):
                    nxt[path + (t,)] = pr * q
        marginals.append(m)
        paths = nxt
    return marginals


@pytest.mark.parametrize("native", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["native", "pytorch"])
@pytest.mark.parametrize("kind", ["none", "ngram", "draft"])
def test_speculative_sampling_keeps_the_target_distribution(kind, native):  # the PyTorch path's run: minutes
    scipy_stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(2)  # a model whose samples often repeat prompt tokens, so prompt lookup proposes often
    model = _model(vocab=6)
    draft = _model(vocab=6) if kind == "draft" else None  # a different random model: q differs from p
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]  # prompt lookup finds n-grams to propose
    exact = _exact_marginals(model, prompt, 3)
    n = 3000
    engine = Engine(model, config=EngineConfig(speculative=kind, num_speculative_tokens=2, max_running=512,
                                               native_decode=native), draft=draft)
    outs = engine.generate([prompt] * n, [SamplingParams(max_new_tokens=3, temperature=1.0, ignore_eos=True, seed=i)
                                          for i in range(n)])
    if kind != "none":
        assert engine.stats()["draft_tokens_total"] > n // 2
    for pos in (1, 2):  # tokens drawn after verification rounds
        counts = Counter(o.token_ids[pos] for o in outs)
        observed = [counts.get(t, 0) for t in range(6)]
        expected = (exact[pos] * n).tolist()
        assert scipy_stats.chisquare(observed, expected).pvalue > 1e-3, (pos, observed, expected)


def test_lora_adapters_chosen_per_request_in_one_batch(tmp_path):
    from lmforge.transforms.lora import LoraConfig, apply_lora, set_adapter
    from lmforge.transforms.peft import save_adapter

    base = _model()
    for name in ("a", "b"):
        tuned = _model()
        tuned.load_state_dict(base.state_dict())
        apply_lora(tuned, LoraConfig(rank=4, targets=["q", "v", "up"]), name)
        with torch.no_grad():
            for n, p in tuned.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        save_adapter(tuned, tmp_path / name, name)
    refs = {}
    for name in (None, "a", "b"):
        m = _model()
        m.load_state_dict(base.state_dict())
        if name:
            from lmforge.transforms.peft import load_adapter

            load_adapter(m, tmp_path / name, name)
            set_adapter(m, name)
        refs[name] = _reference(m, PROMPTS[0], 12)
    assert len({tuple(r) for r in refs.values()}) == 3
    engine = Engine(base)
    engine.load_adapter("a", str(tmp_path / "a"))
    engine.load_adapter("b", str(tmp_path / "b"))
    ids = {name: engine.add_request(PROMPTS[0], GREEDY, adapter=name) for name in (None, "a", "b", "a")}
    got: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.token_ids)
    assert {name: got[i] for name, i in ids.items()} == refs
    assert sorted(engine.adapters) == ["a", "b"]


def test_generation_leaves_a_trained_lora_models_adapters_active():
    """A model being trained with LoRA and evaluated with the engine in between: after generating, its forward
    still adds the adapter (the engine routed the layers per row only for its own passes)."""
    from lmforge.transforms.lora import LoraConfig, lora_layers, apply_lora

    model = apply_lora(_model(), LoraConfig(rank=4, targets=["q", "v", "up"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = torch.tensor([PROMPTS[0]])
    before = model(x).logits
    active = [w.active for _, w in lora_layers(model)]
    assert set(active) == {"default"}
    Engine(model).generate(PROMPTS[:2], GREEDY)
    assert [w.active for _, w in lora_layers(model)] == active
    torch.testing.assert_close(model(x).logits, before)


def test_prompt_tuned_model_generates_as_its_full_forward():
    from lmforge.transforms.prompt_tuning import PromptConfig, apply_prompt_tuning

    model = apply_prompt_tuning(_model(), PromptConfig(num_virtual_tokens=5, init_text=None))
    with torch.no_grad():
        model.prompt.embedding.normal_(0, 1.0)
    engine = Engine(model, config=EngineConfig(block_size=4))
    outs = [o.token_ids for o in engine.generate(PROMPTS[:3], GREEDY)]
    assert outs == [_reference(model, p, 12) for p in PROMPTS[:3]]  # the model prepends its virtual tokens


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_cpu_fast_paths_follow_in_place_updates(native):
    model = _model()
    engine = Engine(model, config=EngineConfig(native_decode=native))
    assert engine.packed and (engine.decode_path == "native") == native  # the CPU fast paths are on
    before = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # as an optimizer step would
    after = engine.generate([PROMPTS[0]], GREEDY)[0].token_ids
    assert after == _reference(model, PROMPTS[0], 12) and after != before
    assert "forward" not in model.blocks[0].attn.q.__dict__  # the model itself is left untouched


def test_encoder_embeddings_and_classifier_logits_batched():
    enc = Transformer(ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                  causal=False, norm="layernorm", norm_position="post", position="learned",
                                  max_position_embeddings=32, head="none")).eval()
    engine = Engine(enc)
    batch = [[1, 2, 3, 4, 5], [6, 7], [8]]
    e = engine.embed(batch)
    for i, x in enumerate(batch):
        with torch.no_grad():
            solo = torch.nn.functional.normalize(enc(torch.tensor([x])).hidden[0].mean(0), dim=-1)
        torch.testing.assert_close(e[i], solo, atol=1e-5, rtol=1e-5)
    clf = _model(head="classifier", num_labels=3, pad_token_id=0)
    logits = Engine(clf).classify(batch)
    with torch.no_grad():
        solo = torch.cat([clf(torch.tensor([x])).logits for x in batch])
    torch.testing.assert_close(logits, solo, atol=1e-5, rtol=1e-5)
    with pytest.raises(RequestError, match="only causal LMs"):
        Engine(clf).add_request([1], SamplingParams())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_matches_cpu_greedy_and_speculative():
    model = _model()
    cpu = [o.token_ids for o in Engine(model).generate(PROMPTS, GREEDY)]
    gpu = model.to("cuda")
    assert [o.token_ids for o in Engine(gpu).generate(PROMPTS, GREEDY)] == cpu
    spec = Engine(gpu, config=EngineConfig(speculative="ngram", num_speculative_tokens=3))
    assert [o.token_ids for o in spec.generate(PROMPTS, GREEDY)] == cpu
    sampled = Engine(gpu).generate([PROMPTS[0]] * 2, SamplingParams(max_new_tokens=8, temperature=1.0, seed=3))
    assert sampled[0].token_ids == sampled[1].token_ids
