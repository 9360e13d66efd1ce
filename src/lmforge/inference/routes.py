"""The OpenAI-compatible routes (completions, chat completions, embeddings, classification, models, health,
metrics) and `create_app`, which assembles them with the HTTP shell of `inference/http.py` into a FastAPI app.

Each route is a module-level function; what they share per app (the engine bridge, tokenizer, served name,
limits) is a `ServerState` kept in `app.state.lmforge` and handed to them as a FastAPI dependency.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..data.classify import ClassifyExample, classification_outputs, tokenize_examples
from ..data.qa import QAData, QAExample
from ..objectives.span import answer_questions
from ..tokenizer.base import Tokenizer
from ..tokenizer.chat import encode_chat
from .bridge import AsyncEngine, RequestGroup
from .http import APIError, RequestGuard, document_errors_as_answered, error_response, install_error_handlers
from .protocol import (ERROR_RESPONSES, ChatCompletionRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest,
                       GenerationRequest, QARequest)
from .request import RequestOutput
from .sampling import SamplingParams, TokenLogprob

__all__ = ["create_app", "ServerState", "router", "MAX_SEQUENCES", "MAX_STOP", "MAX_INPUTS", "EMBED_CHUNK",
           "METRICS"]

log = logging.getLogger(__name__)

MAX_SEQUENCES = 64  # most engine requests one HTTP request may start (prompts x n)
MAX_STOP = 16  # most stop strings per request
TASK_ROUTES = {"classifier": " and /v1/classify", "span": " and /v1/qa"}  # what a model with a task head serves
MAX_INPUTS = 256  # most inputs per embeddings / classify request
EMBED_CHUNK = 32  # inputs embedded per engine call (generation interleaves between chunks)
METRICS = (  # (Prometheus name without the lmforge_ prefix, engine stats key, type, help)
    ("queue_length", "waiting", "gauge", "Requests waiting for a batch slot."),
    ("running_requests", "running", "gauge", "Requests in the running batch."),
    ("kv_blocks_used", "kv_blocks_used", "gauge", "KV-cache blocks in use."),
    ("kv_blocks_total", "kv_blocks_total", "gauge", "KV-cache blocks in the pool."),
    ("generation_tokens_total", "generation_tokens_total", "counter", "Tokens generated."),
    ("prompt_tokens_total", "prompt_tokens_total", "counter", "Prompt tokens received."),
    ("tokens_per_second", "tokens_per_second", "gauge", "Tokens generated per second, recent window."),
    ("requests_finished_total", "requests_finished_total", "counter", "Requests finished (any reason)."),
    ("prefix_cache_hit_tokens_total", "prefix_cache_hit_tokens", "counter", "Prompt tokens found in the prefix cache."),
)


@dataclass
class ServerState:
    """What every route of one app shares; `create_app` makes it and keeps it in app.state.lmforge."""

    engine: AsyncEngine
    """The engine bridge every request goes through."""
    tokenizer: Tokenizer
    """Encodes prompts and messages; decodes single tokens for log-probs."""
    model_name: str
    """The served model's name (adapters are served under their own names)."""
    default_max_tokens: int | None = None
    """Chat completions without max_tokens stop after this many tokens (None: at the end of the context)."""
    started: int = field(default_factory=lambda: int(time.time()))
    """When the app was made: the `created` of every model in /v1/models."""

    @property
    def model_cfg(self) -> Any:
        """The served model's ModelConfig."""
        return self.engine.model_cfg


def server_state(request: Request) -> ServerState:
    """The dependency that hands a route its app's state."""
    return request.app.state.lmforge


State = Annotated[ServerState, Depends(server_state)]
router = APIRouter()


# ----------------------------------------------------------------------------- checking requests

def adapter_for(state: ServerState, model: str | None) -> str | None:
    """None for the served model; the adapter's name for an adapter; 404 otherwise (names, never paths)."""
    if model is None or model == state.model_name:
        return None
    if model in state.engine.adapters:
        return model
    served = [state.model_name, *state.engine.adapters]
    raise APIError(404, f"model {model!r} does not exist; this server serves {served}", param="model",
                   code="model_not_found")


def base_only(state: ServerState, model: str | None) -> None:
    """400 when `model` names an adapter: adapters change text generation only."""
    if adapter_for(state, model) is not None:
        raise APIError(400, f"adapter {model!r} applies to text generation only; use {state.model_name!r}",
                       param="model")


def unsupported(**used: Any) -> None:
    """400 naming the first of these request fields that is set."""
    for name, value in used.items():
        if value:
            raise APIError(400, f"{name} is not supported by this server", param=name)


def need_generation(state: ServerState) -> None:
    """400 unless the served model is a causal LM."""
    cfg = state.model_cfg
    if cfg.head != "lm" or not cfg.causal:
        raise APIError(400, f"{state.model_name} is not a causal language model (head {cfg.head!r}); it serves "
                            "/v1/embeddings" + TASK_ROUTES.get(cfg.head, ""),
                       param="model")


def check_ids(state: ServerState, ids: list[int], param: str) -> list[int]:
    """`ids` when non-empty and inside the vocabulary, else 400 naming `param`."""
    vocab = state.model_cfg.vocab_size
    if not ids:
        raise APIError(400, f"{param} is empty: give at least one token", param=param)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)
    return ids


def token_lists(state: ServerState, x: str | list[str] | list[int] | list[list[int]], param: str) -> list[list[int]]:
    """A text, texts, a token list or token lists (OpenAI's `prompt` / `input`) as token lists."""
    tok = state.tokenizer
    if isinstance(x, str):
        return [tok.encode(x)]
    if not x:
        raise APIError(400, f"{param} is empty", param=param)
    if all(isinstance(t, int) for t in x):
        return [list(x)]
    return [tok.encode(t) if isinstance(t, str) else list(t) for t in x]


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """OpenAI's `stop` as a tuple of at most MAX_STOP non-empty strings."""
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop strings, found {len(items)}", param="stop")
    if any(not s for s in items):
        raise APIError(400, "stop: stop strings must be non-empty", param="stop")
    return tuple(items)


def sampling(body: GenerationRequest, max_tokens: int, logprobs: int | None, i: int) -> SamplingParams:
    """The engine's parameters for choice `i` of a request (a seeded request gives choice i the seed + i)."""
    unsupported(logit_bias=body.logit_bias)
    return SamplingParams(
        max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=None if body.seed is None else body.seed + i,
        stop=stop_strings(body.stop), ignore_eos=body.ignore_eos, logprobs=logprobs)


def chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    """The conversation's token ids through the chat template, with the generation prompt."""
    unsupported(tools=body.tools, response_format=(body.response_format or {}).get("type", "text") != "text")
    if not body.messages:
        raise APIError(400, "messages is empty: give at least one message", param="messages")
    messages = []
    for k, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{k}].content: only text parts are supported, found "
                                        f"type {part.get('type')!r}", param=f"messages.{k}.content")
                parts.append(part["text"])
            content = "".join(parts)
        role = "system" if m.role == "developer" else m.role
        messages.append({"role": role, "content": content or ""})
    return check_ids(state, encode_chat(state.tokenizer, messages, add_generation_prompt=True).ids, "messages")


# ----------------------------------------------------------------------------- answering

@dataclass
class Choice:
    """A finished choice, aggregated from its outputs."""

    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        if out.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(out.logprobs)
        if out.finished:
            self.finish_reason = out.finish_reason
            self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens


def finite(x: float) -> float:
    """A JSON-safe log probability (-inf becomes -9999.0, as OpenAI reports impossible tokens)."""
    return x if math.isfinite(x) else -9999.0


def token_str(state: ServerState, t: int) -> str:
    """One token's text, special tokens included (log-probs name every token)."""
    return state.tokenizer.decode([t], skip_special_tokens=False)


def completion_logprobs(state: ServerState, lps: list[TokenLogprob], offset: int, top: bool) -> dict:
    """The `logprobs` of a completion choice: tokens, their log-probs, top alternatives, text offsets."""
    tokens = [token_str(state, lp.token_id) for lp in lps]
    offsets = []
    for s in tokens:
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": [finite(lp.logprob) for lp in lps],
            "top_logprobs": [{token_str(state, t): finite(v) for t, v in lp.top} for lp in lps] if top else None,
            "text_offset": offsets}


def chat_logprobs(state: ServerState, lps: list[TokenLogprob]) -> dict:
    """The `logprobs` of a chat choice: per token its text, log-prob, UTF-8 bytes and top alternatives."""
    def entry(t: int, v: float) -> dict:
        s = token_str(state, t)
        return {"token": s, "logprob": finite(v), "bytes": list(s.encode("utf-8"))}

    return {"content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                        for lp in lps], "refusal": None}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's `usage` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage_of(choices: list[Choice], n: int) -> dict[str, int]:
    """Prompt tokens once per prompt (choice i * n), completion tokens of every choice."""
    return usage(sum(c.prompt_tokens for c in choices[::n]), sum(c.completion_tokens for c in choices))


async def until_disconnect(request: Request, coro: Any) -> Any:
    """Await `coro`; if the client disconnects first, cancel it (its requests are aborted) and raise."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise APIError(499, "client disconnected")
    return task.result()


async def collect(request: Request, group: RequestGroup, n_choices: int) -> list[Choice]:
    """Every choice of a non-streamed request, finished (the requests are aborted if the client leaves)."""
    choices = [Choice() for _ in range(n_choices)]

    async def run() -> None:
        async with group:
            async for i, out in group:
                choices[i].add(out)

    await until_disconnect(request, run())
    return choices


def sse(obj: dict) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def event_stream(group: RequestGroup, n: int, head: dict, include_usage: bool,
                       chunk: Callable[[int, RequestOutput], dict | None],
                       first: Callable[[int], dict] | None = None) -> AsyncIterator[str]:
    """SSE events: per choice an optional opening chunk, then one chunk per output with news, the usage
    chunk when asked, and [DONE]. Leaving early (client gone → cancelled) aborts the requests."""
    totals = [[0, 0] for _ in group.ids]
    try:
        async with group:
            for i in range(len(group.ids) if first is not None else 0):
                yield sse(first(i))
            async for i, out in group:
                if out.finished:
                    totals[i] = [out.prompt_tokens, out.completion_tokens]
                c = chunk(i, out)
                if c is not None:
                    yield sse(c)
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band, as OpenAI does
        log.exception("stream failed")
        yield sse({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None,
                             "code": None}})
        return
    if include_usage:
        yield sse(dict(head, choices=[], usage=usage(sum(t[0] for t in totals[::n]), sum(t[1] for t in totals))))
    yield "data: [DONE]\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    """A streamed text/event-stream answer that proxies must not buffer."""
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------- the routes

@router.get("/health")
async def health(state: State) -> Response:
    if state.engine.draining:
        return error_response(503, "the server is shutting down", type="server_error", code="shutting_down")
    return JSONResponse({"status": "ok"})


@router.get("/v1/models")
async def models(state: State) -> Response:
    started, name = state.started, state.model_name
    entry = {"id": name, "object": "model", "created": started, "owned_by": "lmforge"}
    return JSONResponse({"object": "list", "data": [entry] + [
        {"id": a, "object": "model", "created": started, "owned_by": "lmforge", "parent": name}
        for a in state.engine.adapters]})


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: State) -> Response:
    adapter = adapter_for(state, body.model)
    need_generation(state)
    unsupported(echo=body.echo, suffix=body.suffix, best_of=body.best_of not in (None, 1, body.n))
    prompts = [check_ids(state, x, "prompt") for x in token_lists(state, body.prompt, "prompt")]
    n = body.n
    if len(prompts) * n > MAX_SEQUENCES:
        raise APIError(400, f"{len(prompts)} prompts x n={n} exceeds {MAX_SEQUENCES} sequences per request",
                       param="n")
    max_tokens = body.max_tokens
    params = []
    for ids in prompts:
        mt = max_tokens if max_tokens is not None else max(state.engine.max_context - len(ids), 1)
        params += [sampling(body, mt, body.logprobs, i) for i in range(n)]
    group = await state.engine.submit([ids for ids in prompts for _ in range(n)], params, adapter)
    rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model
    head = {"id": rid, "object": "text_completion", "created": created, "model": name}
    top = bool(body.logprobs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets = [0] * len(params)

        def chunk(i: int, out: RequestOutput) -> dict | None:
            if not out.text and not out.finished and not out.logprobs:
                return None
            lp = None
            if body.logprobs is not None and out.logprobs:
                lp = completion_logprobs(state, out.logprobs, offsets[i], top)
                offsets[i] += sum(len(s) for s in lp["tokens"])
            choice = {"index": i, "text": out.text, "logprobs": lp,
                      "finish_reason": out.finish_reason if out.finished else None}
            return dict(head, choices=[choice], **({"usage": None} if include_usage else {}))

        return sse_response(event_stream(group, n, head, include_usage, chunk))
    choices = await collect(request, group, len(params))
    return JSONResponse(dict(head, choices=[
        {"index": i, "text": c.text, "finish_reason": c.finish_reason,
         "logprobs": completion_logprobs(state, c.logprobs or [], 0, top) if body.logprobs is not None else None}
        for i, c in enumerate(choices)], usage=usage_of(choices, n)))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: State) -> Response:
    adapter = adapter_for(state, body.model)
    need_generation(state)
    ids = chat_prompt(state, body)
    context = state.engine.max_context
    room = context - len(ids)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        if room < 1:
            raise APIError(400, f"the conversation ({len(ids)} tokens) fills the context length {context}; "
                                "shorten it", param="messages")
        max_tokens = min(room, state.default_max_tokens or room)
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    n = body.n
    params = [sampling(body, max_tokens, top if body.logprobs else None, i) for i in range(n)]
    group = await state.engine.submit([ids] * n, params, adapter)
    rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}
        extra = {"usage": None} if include_usage else {}

        def first(i: int) -> dict:
            return dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **extra)

        def chunk(i: int, out: RequestOutput) -> dict | None:
            if not out.text and not out.finished and not out.logprobs:
                return None
            lp = chat_logprobs(state, out.logprobs) if body.logprobs and out.logprobs else None
            choice = {"index": i, "delta": {"content": out.text} if out.text else {}, "logprobs": lp,
                      "finish_reason": out.finish_reason if out.finished else None}
            return dict(head, choices=[choice], **extra)

        return sse_response(event_stream(group, n, head, include_usage, chunk, first))
    choices = await collect(request, group, n)
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "logprobs": chat_logprobs(state, c.logprobs or []) if body.logprobs else None,
                     "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
        "usage": usage_of(choices, n)})


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, state: State) -> Response:
    base_only(state, body.model)
    cfg, context = state.model_cfg, state.engine.max_context
    if cfg.causal:
        raise APIError(400, f"{state.model_name} is a decoder-only (causal) model; embeddings need an encoder model "
                            "such as all-minilm-l6-v2", param="model")
    batch = token_lists(state, body.input, "input")
    if len(batch) > MAX_INPUTS:
        raise APIError(400, f"input: at most {MAX_INPUTS} inputs per request, found {len(batch)}", param="input")
    if body.dimensions is not None and body.dimensions != cfg.hidden_size:
        raise APIError(400, f"dimensions: this model gives {cfg.hidden_size}, found {body.dimensions}",
                       param="dimensions")
    for k, ids in enumerate(batch):
        check_ids(state, ids, "input")
        if len(ids) > context:
            raise APIError(400, f"input {k} has {len(ids)} tokens, more than the context length {context}",
                           param="input")
    vectors = []
    for s in range(0, len(batch), EMBED_CHUNK):
        part = batch[s:s + EMBED_CHUNK]
        vectors += (await state.engine.call(lambda e, part=part: e.embed(part, normalize=True))).float().cpu()
    data = []
    for i, v in enumerate(vectors):
        emb: Any = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
                    if body.encoding_format == "base64" else v.tolist())
        data.append({"object": "embedding", "index": i, "embedding": emb})
    used = sum(map(len, batch))
    return JSONResponse({"object": "list", "data": data, "model": body.model,
                         "usage": {"prompt_tokens": used, "total_tokens": used}})


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, state: State) -> Response:
    base_only(state, body.model)
    cfg = state.model_cfg
    if cfg.head != "classifier":
        raise APIError(400, f"{state.model_name} has a {cfg.head!r} head; /v1/classify needs a classifier model",
                       param="model")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise APIError(400, "input is empty", param="input")
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"input: at most {MAX_INPUTS} texts per request, found {len(texts)}", param="input")
    examples = [ClassifyExample(where=f"input {i}", text=t, text_pair=None, label=0) for i, t in enumerate(texts)]
    tokenized, _ = tokenize_examples(examples, state.tokenizer, state.engine.max_context)
    ids = [e.input_ids for e in tokenized]
    logits = (await state.engine.call(lambda e: e.classify(ids))).float().cpu()  # (B, K)
    results = classification_outputs(texts, logits, cfg.id2label, digits=6)
    return JSONResponse({"output": results[0]["output"]} if isinstance(body.input, str) else results)


@router.post("/v1/qa")
async def qa(body: QARequest, state: State) -> Response:
    base_only(state, body.model)
    if state.model_cfg.head != "span":
        raise APIError(400, f"{state.model_name} has a {state.model_cfg.head!r} head; /v1/qa needs a span (extractive "
                            f"question answering) model", param="model")
    items = body.input if isinstance(body.input, list) else [body.input]
    if not items:
        raise APIError(400, "input is empty", param="input")
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"input: at most {MAX_INPUTS} questions per request, found {len(items)}", param="input")
    for i, it in enumerate(items):
        if not it.question.strip() or not it.context.strip():
            raise APIError(400, f"input {i}: question and context must both be non-empty", param="input")
    examples = [QAExample(str(i), it.question, it.context, [], f"input {i}") for i, it in enumerate(items)]
    settings = QAData(max_answer_length=body.max_answer_length, null_threshold=body.null_threshold)
    answers = await state.engine.call(lambda e: answer_questions(e.model, state.tokenizer, examples,
                                                                 settings.within(e.max_context)))
    results = [{"answer": a["answer"], "score": round(a["score"], 6), "start": a["start_char"], "end": a["end_char"]}
               for a in answers]
    return JSONResponse(results if isinstance(body.input, list) else results[0])


@router.get("/metrics")
async def metrics(state: State) -> Response:
    ae = state.engine
    stats, tps, path = await ae.call(lambda e: (e.stats(), ae.tokens_per_second(), e.decode_path))
    stats["tokens_per_second"] = round(tps, 3)
    text = "".join(f"# HELP lmforge_{name} {doc}\n# TYPE lmforge_{name} {kind}\nlmforge_{name} {stats[key]}\n"
                   for name, key, kind, doc in METRICS)
    kind, _, why = path.partition(" (")  # "native", or "pytorch (the reason)"
    why = why[:-1].replace("\\", "\\\\").replace('"', '\\"')
    text += ("# HELP lmforge_decode_path_info The path decode steps run on: native (one C++ call per step) or "
             "pytorch, with the reason.\n# TYPE lmforge_decode_path_info gauge\n"
             f'lmforge_decode_path_info{{path="{kind}",reason="{why}"}} 1\n')
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


# ----------------------------------------------------------------------------- the application

def create_app(async_engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, default_max_tokens: int | None = None) -> FastAPI:
    """The FastAPI app serving `async_engine` as `model_name` (adapters as their own model names).

    `api_key`: when set, every route but /health needs `Authorization: Bearer KEY`. `max_body_bytes`: larger
    bodies get 413. `default_max_tokens`: chat completions without max_tokens stop there (None: at the end of
    the context)."""
    app = FastAPI(title="lmforge", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  responses=ERROR_RESPONSES)
    app.state.lmforge = ServerState(async_engine, tokenizer, model_name, default_max_tokens)
    document_errors_as_answered(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes)
    install_error_handlers(app)
    app.include_router(router)
    return app
