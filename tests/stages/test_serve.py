"""`lmforge serve` and `lmforge chat`: the official `openai` client against a live uvicorn server (127.0.0.1, a
free port, a background thread) serving tiny random models with the real GPT-2 tokenizer, and the real
all-MiniLM-L6-v2 for embeddings. Answers are compared with the engine's own greedy outputs."""

from __future__ import annotations

import asyncio
import copy
import http.client
import inspect
import io
import json
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass

import openai
import pytest
import torch

import lmforge
from lmforge import cli
from lmforge.inference.bridge import AsyncEngine
from lmforge.inference.engine import Engine, EngineConfig, SamplingParams
from lmforge.inference.http import RunningServer, start_server
from lmforge.inference.routes import create_app
from lmforge.models import ModelConfig, Transformer
from lmforge.tokenizer import encode_chat

KEY = "sk-test-1234"
LONG = 4000  # tokens of a request that runs for seconds unless aborted


@dataclass
class Served:
    ae: AsyncEngine
    server: RunningServer
    tok: object

    @property
    def port(self) -> int:
        return self.server.port

    def client(self, key: str | None = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=key or "none", max_retries=0, timeout=60, **kw)

    def reference(self, ids: list[int], max_tokens: int, adapter: str | None = None, **kw):
        """The engine's own output for `ids` alone (run on the engine thread while the server is idle)."""
        params = SamplingParams(max_new_tokens=max_tokens, **kw)
        return self.ae.call_sync(lambda e: e.generate([ids], params, adapter=adapter)[0], timeout=60)

    def stats(self) -> dict:
        return self.ae.call_sync(lambda e: e.stats(), timeout=30)


def _tiny_lm(tok, seed: int = 0, context: int = 4096) -> Transformer:
    """A random 2-layer Llama over the GPT-2 vocabulary; a wide init keeps greedy choices far from ties, so
    batched and solo runs pick the same tokens."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=context, eos_token_id=tok.eos_id,
                      initializer_range=0.5)
    return Transformer(cfg).eval()


def _serve(model, tok, name: str, api_key: str | None = None, max_queue: int = 64, **app_kw) -> Served:
    ae = AsyncEngine(Engine(model, tok, EngineConfig(kv_cache_gb=0.05)), max_queue=max_queue)
    server = start_server(create_app(ae, tok, name, api_key=api_key, **app_kw), port=0)  # default host
    return Served(ae, server, tok)


def _close(s: Served) -> None:
    s.server.stop()
    s.ae.close()


@pytest.fixture(scope="module")
def lm(gpt2_tokenizer, tmp_path_factory):
    """The tiny LM served as "tiny" with an API key, a 32 KiB body limit and a LoRA adapter "tiny-lora"."""
    from lmforge.transforms.lora import LoraConfig, apply_lora
    from lmforge.transforms.peft import save_adapter

    model = _tiny_lm(gpt2_tokenizer)
    peft = apply_lora(copy.deepcopy(model), LoraConfig(rank=4, alpha=8, targets=["q", "v", "down"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1.0)
    adapter = save_adapter(peft, tmp_path_factory.mktemp("adapter") / "tiny-lora")
    s = _serve(model, gpt2_tokenizer, "tiny", api_key=KEY, max_body_bytes=32_768)
    asyncio.run(s.ae.load_adapter("tiny-lora", str(adapter)))
    yield s
    _close(s)


def _http(s: Served, method: str, path: str, body=None, headers: dict | None = None, key: str | None = KEY,
          raw: bytes | None = None, chunks: list[bytes] | None = None) -> tuple[int, object]:
    """A raw HTTP request; returns (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    data = iter(chunks) if chunks is not None else raw if raw is not None else (
        json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers=h, encode_chunked=chunks is not None)
    r = conn.getresponse()
    payload = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(payload)
    except json.JSONDecodeError:
        return r.status, payload


def _error(status_and_body, status: int, code: str | None = None) -> dict:
    got, body = status_and_body
    assert got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def _sse(s: Served, path: str, body: dict) -> list[str]:
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Authorization": f"Bearer {KEY}",
                                                                "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    text = r.read().decode()
    conn.close()
    assert text.endswith("\n\n")
    return [e.removeprefix("data: ") for e in text[:-2].split("\n\n")]


# ----------------------------------------------------------------------------- generation

def test_binds_loopback_by_default(lm):
    from lmforge.stages.serve import Config

    assert lm.server.server.servers[0].sockets[0].getsockname()[0] == "127.0.0.1"
    assert inspect.signature(start_server).parameters["host"].default == "127.0.0.1"
    assert Config(model="x").host == "127.0.0.1"


def test_models_lists_model_and_adapters(lm):
    ids = [m.id for m in lm.client().models.list().data]
    assert ids == ["tiny", "tiny-lora"]


def test_completion_equals_engine_greedy(lm):
    tok = lm.tok
    ids = tok.encode("def main():")
    ref = lm.reference(ids, 12)
    r = lm.client().completions.create(model="tiny", prompt="def main():", max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text == tok.decode(ref.token_ids)
    assert r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    by_ids = lm.client().completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == ref.text
    two = lm.client().completions.create(model="tiny", prompt=["def main():", "x = 1"], max_tokens=12,
                                         temperature=0)
    assert [c.text for c in two.choices] == [ref.text, lm.reference(tok.encode("x = 1"), 12).text]


def test_chat_goes_through_the_template(lm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = encode_chat(lm.tok, messages, add_generation_prompt=True).ids
    assert lm.tok.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    ref = lm.reference(ids, 10)
    r = lm.client().chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == ref.completion_tokens
    r2 = lm.client().chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10,
                                             temperature=0)
    assert r2.choices[0].message.content == ref.text


def test_adapter_is_selected_by_model_name(lm):
    ids = lm.tok.encode("Once upon a time")
    base, tuned = lm.reference(ids, 10), lm.reference(ids, 10, adapter="tiny-lora")
    assert base.text != tuned.text  # the adapter changes the model
    r = lm.client().completions.create(model="tiny-lora", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.choices[0].text == tuned.text and r.model == "tiny-lora"


def test_streaming_equals_non_streamed(lm):
    c = lm.client()
    full = c.completions.create(model="tiny", prompt="import os", max_tokens=16, temperature=0).choices[0].text
    parts = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="import os", max_tokens=16,
                                                               temperature=0, stream=True) if ch.choices]
    assert len(parts) > 1 and "".join(parts) == full
    msgs = [{"role": "user", "content": "Tell me a story"}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    # the wire format: data: {json} events, usage on request, [DONE] last
    events = _sse(lm, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 16,
                                               "temperature": 0, "stream": True,
                                               "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 16
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_n_choices_and_seeds(lm):
    c = lm.client()
    kw = dict(model="tiny", prompt="The weather", max_tokens=8, temperature=1.0)
    r = c.completions.create(n=3, seed=7, **kw)
    texts = [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
    assert len(texts) == 3 and len(set(texts)) == 3  # different seeds (7, 8, 9) give different samples
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(lm.tok.encode("The weather"))
    again = c.completions.create(n=3, seed=7, **kw)
    assert [ch.text for ch in sorted(again.choices, key=lambda ch: ch.index)] == texts
    assert c.completions.create(seed=8, **kw).choices[0].text == texts[1]  # choice i uses seed + i
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                     temperature=0, n=2)
    assert [ch.index for ch in chat.choices] == [0, 1]


def test_logprobs_shapes(lm):
    c = lm.client()
    r = c.completions.create(model="tiny", prompt="for i in", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3 and math.isclose(max(top.values()), chosen, rel_tol=1e-4)
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 4
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob and t.bytes == list(t.token.encode())
    plain = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      temperature=0)
    assert plain.choices[0].logprobs is None


def test_32_concurrent_clients_get_their_solo_answers(lm):
    prompts = [f"Request number {i}: {'abc' * (i % 5)}" for i in range(32)]
    solo = [lm.reference(lm.tok.encode(p), 12).text for p in prompts]
    client = openai.AsyncOpenAI(base_url=lm.server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(i: int) -> str:
        if i % 2:
            stream = await client.completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0,
                                                     stream=True)
            return "".join([ch.choices[0].text async for ch in stream if ch.choices])
        r = await client.completions.create(model="tiny", prompt=prompts[i], max_tokens=12, temperature=0)
        return r.choices[0].text

    async def all_of_them() -> list[str]:
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    assert asyncio.run(all_of_them()) == solo
    assert lm.stats()["running"] == 0


def test_async_engine_stream_and_early_exit(lm):
    ids = lm.tok.encode("stream me")
    ref = lm.reference(ids, 6)

    async def run() -> tuple[list, int]:
        outs = [o async for o in lm.ae.stream(ids, SamplingParams(max_new_tokens=6))]
        seen = 0
        async for _ in lm.ae.stream(ids, SamplingParams(max_new_tokens=LONG, ignore_eos=True)):
            seen += 1
            if seen == 3:
                break  # closing the generator aborts the request
        return outs, seen

    outs, seen = asyncio.run(run())
    assert "".join(o.text for o in outs) == ref.text and outs[-1].finished and not outs[0].finished
    assert [t for o in outs for t in o.token_ids] == ref.token_ids
    assert _wait_idle(lm)["running"] == 0


def _wait_idle(s: Served, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = s.stats()
        if st["running"] == 0 and st["waiting"] == 0 and st["kv_blocks_used"] == 0 and s.ae.in_flight == 0:
            return st
        time.sleep(0.05)
    raise AssertionError(f"the engine is still busy: {s.stats()}")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_kv_blocks(lm, stream):
    before = _wait_idle(lm)
    conn = http.client.HTTPConnection("127.0.0.1", lm.port, timeout=30)
    body = {"model": "tiny", "prompt": "Count with me:", "max_tokens": LONG, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Authorization": f"Bearer {KEY}",
                                                                            "Content-Type": "application/json"})
    if stream:
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
    else:
        deadline = time.monotonic() + 10
        while lm.stats()["generation_tokens_total"] < before["generation_tokens_total"] + 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert lm.stats()["kv_blocks_used"] > 0
    conn.sock.shutdown(2)
    conn.close()
    after = _wait_idle(lm)
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < LONG  # aborted, not finished


# ----------------------------------------------------------------------------- errors

def test_bad_requests_are_400_in_openai_shape(lm):
    _error(_http(lm, "POST", "/v1/completions", raw=b"{not json"), 400)
    err = _error(_http(lm, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}), 400)
    assert err["param"] == "max_tokens" and err["type"] == "invalid_request_error"
    assert "prompt" in _error(_http(lm, "POST", "/v1/completions", {"model": "tiny"}), 400)["message"]
    assert _error(_http(lm, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "n": 17}), 400)["param"] == "n"
    _error(_http(lm, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True}), 400)
    _error(_http(lm, "POST", "/v1/completions", {"model": "tiny", "prompt": [10**9]}), 400)
    _error(_http(lm, "POST", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard",
                                                                                    "content": "x"}]}), 400)
    status, body = _http(lm, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2,
                                                         "temperature": 0, "some_future_field": 1})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"  # unknown fields are ignored
    n = len(lm.tok.encode("hello world"))
    with pytest.raises(openai.BadRequestError) as e:
        lm.client().completions.create(model="tiny", prompt="hello world", max_tokens=4095)
    message = e.value.body["message"]
    assert f"({n} tokens)" in message and "4095" in message and "4096" in message
    _error(_http(lm, "POST", "/v1/embeddings", {"model": "tiny", "input": "x"}), 400)  # a decoder-only LM
    _error(_http(lm, "POST", "/v1/classify", {"input": "x"}), 400)


def test_auth_401(lm):
    _error(_http(lm, "GET", "/v1/models", key=None), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        lm.client(key="sk-wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        lm.client(key="sk-wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
    assert _http(lm, "GET", "/health", key=None) == (200, {"status": "ok"})  # stays open


def test_unknown_model_or_adapter_404(lm):
    for name in ("gpt-4", "tiny-lora2", "../tiny-lora", "/etc/passwd"):
        with pytest.raises(openai.NotFoundError) as e:
            lm.client().completions.create(model=name, prompt="x", max_tokens=1)
        assert e.value.body["code"] == "model_not_found"
    _error(_http(lm, "GET", "/v1/nothing-here"), 404)


def test_oversized_body_413(lm):
    with pytest.raises(openai.APIStatusError) as e:
        lm.client().completions.create(model="tiny", prompt="x" * 40_000, max_tokens=1)
    assert e.value.status_code == 413
    # no Content-Length (chunked): the bytes received are counted
    chunks = [b'{"model": "tiny", "prompt": "'] + [b"y" * 8192] * 5 + [b'", "max_tokens": 1}']
    _error(_http(lm, "POST", "/v1/completions", chunks=chunks), 413, "request_too_large")
    small = [b'{"model": "tiny", "prompt": "', b"y" * 100, b'", "max_tokens": 1}']
    assert _http(lm, "POST", "/v1/completions", chunks=small)[0] == 200


def test_metrics(lm):
    lm.client().completions.create(model="tiny", prompt="metrics", max_tokens=3, temperature=0)
    status, text = _http(lm, "GET", "/metrics")
    assert status == 200
    values = dict(re.findall(r"^(lmforge_\w+) (\S+)$", text, re.M))
    names = ["queue_length", "running_requests", "kv_blocks_used", "kv_blocks_total", "generation_tokens_total",
             "prompt_tokens_total", "tokens_per_second", "requests_finished_total", "prefix_cache_hit_tokens_total"]
    assert sorted(values) == sorted(f"lmforge_{n}" for n in names)
    assert all(math.isfinite(float(v)) for v in values.values())
    assert float(values["lmforge_generation_tokens_total"]) >= 3 and float(values["lmforge_kv_blocks_total"]) > 0
    assert float(values["lmforge_tokens_per_second"]) > 0
    path = re.search(r'^lmforge_decode_path_info\{path="(\w+)",reason="(.*)"\} 1$', text, re.M)
    assert path and path.group(1) in ("native", "pytorch") and (path.group(1) == "native") == (not path.group(2))


def test_queue_full_429(gpt2_tokenizer):
    s = _serve(_tiny_lm(gpt2_tokenizer, seed=1, context=256), gpt2_tokenizer, "busy", max_queue=1)
    try:
        entered, gate = threading.Event(), threading.Event()
        blocker = threading.Thread(target=s.ae.call_sync, args=(lambda e: (entered.set(), gate.wait(30)),))
        blocker.start()
        assert entered.wait(10)  # the engine thread is held: requests pile up as commands
        answers: list[tuple[int, object]] = []

        def request() -> None:
            answers.append(_http(s, "POST", "/v1/completions", {"model": "busy", "prompt": "x", "max_tokens": 2},
                                 key=None))

        clients = [threading.Thread(target=request) for _ in range(3)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 10
        while s.ae.pending_commands < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gate.set()  # one add finds the queue empty; the next two find it full
        for t in clients + [blocker]:
            t.join(30)
        assert sorted(status for status, _ in answers) == [200, 429, 429]
        full = [a for a in answers if a[0] == 429][0]
        assert _error(full, 429, "queue_full")["type"] == "rate_limit_error"
    finally:
        _close(s)


def test_shutdown_drains_then_503(gpt2_tokenizer):
    s = _serve(_tiny_lm(gpt2_tokenizer, seed=2), gpt2_tokenizer, "draining")
    try:
        c = s.client(key=None)
        stream = c.completions.create(model="draining", prompt="go", max_tokens=200, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        first = next(iter(stream))
        done = threading.Thread(target=lambda: asyncio.run(s.ae.shutdown(grace_s=60)))
        done.start()
        while not s.ae.draining:
            time.sleep(0.01)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="draining", prompt="late", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "shutting_down"
        assert _http(s, "GET", "/health", key=None)[0] == 503
        rest = list(stream)  # the in-flight request finishes within the grace period
        assert rest[-1].choices[0].finish_reason == "length"
        assert len(first.choices[0].text + "".join(ch.choices[0].text for ch in rest)) > 0
        done.join(30)
        assert not done.is_alive() and s.ae.in_flight == 0
    finally:
        _close(s)


def test_shutdown_aborts_after_grace(gpt2_tokenizer):
    s = _serve(_tiny_lm(gpt2_tokenizer, seed=3), gpt2_tokenizer, "short")
    try:
        stream = s.client(key=None).completions.create(model="short", prompt="go", max_tokens=LONG, temperature=0,
                                                       stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        start = time.monotonic()
        asyncio.run(s.ae.shutdown(grace_s=0.2))
        assert time.monotonic() - start < 10
        assert list(stream)[-1].choices[0].finish_reason == "abort"
    finally:
        _close(s)


# ----------------------------------------------------------------------------- encoders and classifiers

def test_embeddings_match_sentence_transformers_pooling(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    model, tok = lmforge.load(minilm_dir)
    s = _serve(model, tok, "minilm")
    try:
        texts = ["The cat sits on the mat.", "A dog runs in the park.", "Serving embeddings over HTTP"]
        r = s.client(key=None).embeddings.create(model="minilm", input=texts)  # the client asks for base64
        ours = torch.tensor([d.embedding for d in r.data])  # (3, 384)
        hf_tok, hf = AutoTokenizer.from_pretrained(minilm_dir), AutoModel.from_pretrained(minilm_dir).eval()
        batch = hf_tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = hf(**batch).last_hidden_state  # (3, T, 384)
        m = batch["attention_mask"][..., None].float()
        ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        assert ours.shape == (3, 384) and torch.allclose((ours * ref).sum(-1), torch.ones(3), atol=1e-4)
        assert r.usage.prompt_tokens == int(batch["attention_mask"].sum())
        status, body = _http(s, "POST", "/v1/embeddings", {"model": "minilm", "input": texts[0],
                                                           "encoding_format": "float"}, key=None)
        assert status == 200 and torch.allclose(torch.tensor(body["data"][0]["embedding"]), ours[0], atol=1e-5)
        _error(_http(s, "POST", "/v1/completions", {"model": "minilm", "prompt": "x"}, key=None), 400)
    finally:
        _close(s)


def test_classify_endpoint(gpt2_tokenizer):
    from lmforge.data.classify import ClassifyCollate, ClassifyExample, tokenize_examples

    tok = gpt2_tokenizer
    torch.manual_seed(4)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=128, head="classifier", num_labels=2,
                      id2label={0: "negative", 1: "positive"}, pad_token_id=tok.pad_id, initializer_range=0.5)
    model = Transformer(cfg).eval()
    texts = ["I love this film!", "Terrible, a waste of time.", "It was fine I guess", "Best day ever"]
    examples = [ClassifyExample(where="t", text=t, text_pair=None, label=0) for t in texts]
    batch = ClassifyCollate(tok.pad_id)(tokenize_examples(examples, tok, 128)[0])
    batch.pop("labels")
    with torch.no_grad():
        probs = model(**batch).logits.softmax(-1)  # (4, 2)
    labels = [cfg.id2label[int(i)] for i in probs.argmax(-1)]
    assert len(set(labels)) == 2  # both labels occur, so a wrong mapping would show
    s = _serve(model, tok, "sentiment")
    try:
        assert _http(s, "POST", "/v1/classify", {"input": texts[0]}, key=None) == (200, {"output": labels[0]})
        status, out = _http(s, "POST", "/v1/classify", {"input": texts, "model": "sentiment"}, key=None)
        assert status == 200 and [o["output"] for o in out] == labels and [o["input"] for o in out] == texts
        for o, p in zip(out, probs):
            assert o["scores"] == pytest.approx({"negative": float(p[0]), "positive": float(p[1])}, abs=1e-4)
        _error(_http(s, "POST", "/v1/classify", {"input": "x", "model": "other"}, key=None), 404)
        _error(_http(s, "POST", "/v1/classify", {"input": []}, key=None), 400)
    finally:
        _close(s)


def test_qa_endpoint(minilm_dir):
    """POST /v1/qa on the real MiniLM with a span head: the answers equal `answer_questions` run directly, each a
    span of its context; a model without a span head, empty inputs and bad settings are 400."""
    from lmforge.data.qa import QAData, QAExample
    from lmforge.objectives.span import answer_questions

    torch.manual_seed(0)
    model, tok = lmforge.load(minilm_dir, head="span")
    items = [{"question": "What does json.dumps return?",
              "context": "json.dumps(obj, *, indent=None)\n\nSerialize obj to a JSON formatted str."},
             {"question": "What is the default of indent?", "context": "dumps(obj, indent=None, sort_keys=False)"},
             {"question": "Who?", "context": " ".join(["Ada wrote the first program for the engine."] * 60)}]
    examples = [QAExample(str(i), it["question"], it["context"], [], "t") for i, it in enumerate(items)]
    direct = answer_questions(model, tok, examples, QAData())
    assert len(tok.encode(items[2]["context"])) > QAData().max_length  # the long context takes several windows
    s = _serve(model, tok, "qa")
    try:
        status, one = _http(s, "POST", "/v1/qa", {"input": items[0]}, key=None)
        assert status == 200 and one["answer"] == direct[0]["answer"]
        status, out = _http(s, "POST", "/v1/qa", {"input": items, "model": "qa", "max_answer_length": 30}, key=None)
        assert status == 200 and [o["answer"] for o in out] == [d["answer"] for d in direct]
        for o, it in zip(out, items):
            assert o["answer"] and it["context"][o["start"]:o["end"]] == o["answer"]
            assert o["score"] == pytest.approx(next(d["score"] for d in direct if d["answer"] == o["answer"]),
                                               abs=1e-3)
        _error(_http(s, "POST", "/v1/qa", {"input": []}, key=None), 400)
        _error(_http(s, "POST", "/v1/qa", {"input": {"question": " ", "context": "x"}}, key=None), 400)
        _error(_http(s, "POST", "/v1/qa", {"input": items[0], "max_answer_length": 0}, key=None), 400)
        _error(_http(s, "POST", "/v1/classify", {"input": "x"}, key=None), 400)
    finally:
        _close(s)


def test_qa_endpoint_refuses_other_heads(lm):
    _error(_http(lm, "POST", "/v1/qa", {"input": {"question": "q", "context": "c"}}), 400)


# ----------------------------------------------------------------------------- lmforge chat

def test_chat_cli_keeps_history_and_resets(gpt2_tokenizer, tmp_path, monkeypatch, capsys):
    folder = lmforge.save(_tiny_lm(gpt2_tokenizer, seed=5, context=512), gpt2_tokenizer, tmp_path / "m")
    model, tok = lmforge.load(folder)
    engine = Engine(model, tok, EngineConfig(kv_cache_gb=0.01))

    def reply(messages: list[dict]) -> str:
        ids = encode_chat(tok, messages, add_generation_prompt=True).ids
        return engine.generate([ids], SamplingParams(max_new_tokens=6))[0].text

    sys_msg = {"role": "system", "content": "Be kind."}
    r1 = reply([sys_msg, {"role": "user", "content": "hello"}])
    r2 = reply([sys_msg, {"role": "user", "content": "hello"}, {"role": "assistant", "content": r1},
                {"role": "user", "content": "and then?"}])
    assert r1 != r2
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand then?\n/reset\nhello\n/exit\nnever read\n"))
    assert cli.main(["chat", "--model", str(folder), "--system", "Be kind.", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out == f"{r1}\n{r2}\n{r1}\n"
    assert "[new conversation]" in out.err


def test_chat_cli_ctrl_c_stops_only_the_reply(gpt2_tokenizer, tmp_path, monkeypatch, capsys):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals need the main thread")
    folder = lmforge.save(_tiny_lm(gpt2_tokenizer, seed=7, context=512), gpt2_tokenizer, tmp_path / "m")
    model, tok = lmforge.load(folder)
    engine = Engine(model, tok, EngineConfig(kv_cache_gb=0.01))
    hello = [{"role": "user", "content": "hello"}]
    full = engine.generate([encode_chat(tok, hello, add_generation_prompt=True).ids], SamplingParams(max_new_tokens=20))
    steps, real_step = [0], Engine.step

    def step(self):  # Ctrl-C while the third step of the first reply runs
        steps[0] += 1
        if steps[0] == 3:
            signal.raise_signal(signal.SIGINT)
        return real_step(self)

    monkeypatch.setattr(Engine, "step", step)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhello\n"))
    assert cli.main(["chat", "--model", str(folder), "--max-new-tokens", "20"]) == 0
    out = capsys.readouterr()
    partial, second = out.out.split("\n")[:2]
    assert full[0].text.startswith(partial) and len(partial) < len(full[0].text)
    assert out.err.count("[stopped]") == 1
    history = hello + [{"role": "assistant", "content": partial}] + hello  # the partial reply stays in the history
    ids = encode_chat(tok, history, add_generation_prompt=True).ids
    monkeypatch.setattr(Engine, "step", real_step)
    assert second == engine.generate([ids], SamplingParams(max_new_tokens=20))[0].text


def test_serve_config_checks_adapters():
    from lmforge.config import ConfigError
    from lmforge.stages.serve import Config

    assert Config(model="runs/x/final", adapter=["a=/p/a", "b-2=/p/b"]).adapters() == {"a": "/p/a", "b-2": "/p/b"}
    assert Config(model="some/dir/smol.gguf").model_name() == "smol"
    with pytest.raises(ConfigError, match="NAME=PATH"):
        cli._run(["serve", "--model", "m", "--adapter", "../evil"])
    with pytest.raises(ConfigError, match="used twice"):
        cli._run(["serve", "--model", "m", "--adapter", "a=/x,a=/y"])


def test_serve_check_judges_each_reply_by_its_patterns(gpt2_tokenizer, tmp_path, capsys):
    """The smoke test asks every question through the OpenAI client; a reply lacking a pattern fails the stage
    (exit 1) and serve.json says which pattern it lacked; a bad pattern is a config error."""
    from lmforge.config import ConfigError

    folder = lmforge.save(_tiny_lm(gpt2_tokenizer, seed=7), gpt2_tokenizer, tmp_path / "m")
    check = '[{ask: "Say hi.", accept: ["(?s).*"]}, {ask: "Name a prime.", accept: ["(?s).*", "^never-this$"]}]'
    argv = ["serve", "--model", str(folder), "--port", "0", "--kv-cache-gb", "0.05", "--check-max-tokens", "3",
            "--log-level", "warning", "--output", str(tmp_path / "out"), "--check", check]
    assert cli.main(argv) == 1
    served = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert served["questions"] == served["answered"] == 2 and served["accepted"] == 1
    first, second = served["checks"]
    assert first["accepted"] and first["ask"] == "Say hi." and first["tokens"] <= 3
    assert not second["accepted"] and second["missing"] == ["^never-this$"]
    assert "1 of 2 replies accepted" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not a regular expression"):
        cli._run(["serve", "--model", "m", "--check", '[{ask: "x", accept: ["(unclosed"]}]'])


def test_serve_cli_drains_on_sigterm(gpt2_tokenizer, tmp_path):
    """The real `lmforge serve` process: prints its URL, serves, and on SIGTERM answers 503 to new work while the
    in-flight stream runs out its grace period, which then ends with finish_reason "abort"; exit code 0."""
    import subprocess
    import sys

    folder = lmforge.save(_tiny_lm(gpt2_tokenizer, seed=6), gpt2_tokenizer, tmp_path / "m")
    argv = [sys.executable, "-m", "lmforge.cli", "serve", "--model", str(folder), "--port", "0", "--kv-cache-gb",
            "0.02", "--shutdown-grace-s", "1", "--log-level", "warning"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LMFORGE_API_KEY": KEY})
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, line + proc.stderr.read()
        assert "curl http://127.0.0.1:" in proc.stdout.readline()
        client = openai.OpenAI(base_url=m[0], api_key=KEY, max_retries=0, timeout=60)
        stream = client.completions.create(model="m", prompt="go", max_tokens=LONG, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:  # draining: /health says so while the stream still runs
            conn = http.client.HTTPConnection("127.0.0.1", int(m[1]), timeout=10)
            conn.request("GET", "/health")
            if conn.getresponse().status == 503:
                break
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert list(stream)[-1].choices[0].finish_reason == "abort"
        assert proc.wait(20) == 0
    finally:
        proc.kill()
