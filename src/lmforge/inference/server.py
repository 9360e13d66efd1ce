"""An OpenAI-compatible HTTP server over the continuously batching `Engine`.

`AsyncEngine` runs the (not thread-safe) engine in one background thread and hands each request's outputs to
the asyncio task that asked for them; `create_app` builds the FastAPI application (completions, chat, embeddings,
classification, models, health, metrics) with OpenAI's request and error shapes; `start_server` / `serve` run it
under uvicorn, bound to 127.0.0.1 unless told otherwise, and drain gracefully on SIGINT / SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hmac
import json
import logging
import math
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"the lmforge server needs FastAPI and uvicorn ({e.name} is missing): "
                      "pip install 'lmforge[serve]'") from e

from ..tokenizer.base import Tokenizer
from ..tokenizer.chat import ChatFormatError, encode_chat
from .engine import AdapterNotFound, RequestError, RequestOutput, SamplingParams, TokenLogprob
from .protocol import (ERROR_RESPONSES, ChatCompletionRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest,
                       GenerationRequest, lone_surrogate)

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_SEQUENCES = 64  # most engine requests one HTTP request may start (prompts x n)
MAX_STOP = 16  # most stop strings per request
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


class QueueFull(Exception):
    """The engine already has `max_queue` requests waiting for a batch slot (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is draining and admits no new requests (HTTP 503)."""


# ----------------------------------------------------------------------------- the engine thread

class RequestGroup:
    """Outputs of requests submitted together, as (index, RequestOutput) until all have finished.

    Use it as `async with group: async for i, out in group: ...`; leaving the block early (the client went away,
    the task was cancelled) aborts the unfinished requests, which frees their KV-cache blocks."""

    def __init__(self, owner: "AsyncEngine", loop: asyncio.AbstractEventLoop, ids: list[str]):
        self.owner, self.loop, self.ids = owner, loop, ids
        self.queue: asyncio.Queue = asyncio.Queue()
        self.unfinished = set(range(len(ids)))

    def __aiter__(self) -> "RequestGroup":
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self.unfinished:
            raise StopAsyncIteration
        i, out = await self.queue.get()
        if isinstance(out, BaseException):
            self.unfinished.clear()
            raise out
        if out.finished:
            self.unfinished.discard(i)
        return i, out

    async def __aenter__(self) -> "RequestGroup":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Abort the requests that have not finished (a no-op once all have)."""
        if self.unfinished:
            self.owner.abort([self.ids[i] for i in self.unfinished])
            self.unfinished.clear()


class AsyncEngine:
    """Runs an `Engine` in one background thread; asyncio code submits requests and reads their outputs.

    The thread loops: run queued commands (add, abort, embed, …), then one `engine.step()` if anything is
    unfinished, handing each output to its request's asyncio queue with `call_soon_threadsafe`; when idle it
    sleeps on an event. Every engine call happens on that thread, since the engine is not thread-safe."""

    def __init__(self, engine: Any, max_queue: int = 256, tps_window_s: float = 10.0, background: bool = True):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, found {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.tps_window_s = tps_window_s
        self.adapters: list[str] = list(engine.adapters)
        self.max_context: int = engine.max_context
        self.model_cfg = engine.model.cfg
        self.draining = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._sinks: dict[str, tuple[RequestGroup, int]] = {}  # request id -> (group, index); engine thread only
        self._in_flight = 0  # len(self._sinks), written by the engine thread, read anywhere
        self._samples: deque[tuple[float, int]] = deque()  # (time, new tokens) per step, engine thread only
        self._done = threading.Event()  # set when the engine loop has ended
        self._thread: threading.Thread | None = None
        self._loop_thread: threading.Thread | None = None  # the thread running `run`
        if background:
            self._thread = threading.Thread(target=self.run, name="lmforge-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """The engine loop, in the calling thread, until `shutdown` or `close` (made with background=False,
        `serve` runs it on the main thread: in other threads PyTorch's CPU kernels lose their thread pool
        here, measured at half the decoding speed)."""
        self._loop_thread = threading.current_thread()
        try:
            self._run()
        finally:
            self._done.set()

    @property
    def background(self) -> bool:
        """Whether the engine loop runs in a thread of its own (else the owner calls `run`)."""
        return self._thread is not None

    def wait_stopped(self) -> None:
        """Block until the engine loop has ended (after `shutdown` or `close`)."""
        while not self._done.wait(0.2):  # short waits keep the main thread responsive to signals
            pass

    def _alive(self) -> bool:
        return not self._done.is_set() and (self._thread is None or self._thread.is_alive())

    # ---- public, any thread / event loop
    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished."""
        return self._in_flight

    @property
    def pending_commands(self) -> int:
        """Commands queued for the engine thread and not yet run."""
        return self._commands.qsize()

    async def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
                     adapter: str | None = None) -> RequestGroup:
        """Add one engine request per (prompt, params), all or none; raises RequestError, AdapterNotFound,
        QueueFull or ShuttingDown. The returned group yields their outputs."""
        if self.draining:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        loop = asyncio.get_running_loop()
        group = RequestGroup(self, loop, [f"req-{uuid.uuid4().hex}" for _ in prompts])
        fut = self._post(lambda: self._add(group, prompts, params, adapter))
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:  # the add may still run: abort whatever it added (commands run in order)
            self.abort(group.ids)
            raise
        return group

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it makes progress; stopping early (break, close, cancel) aborts it."""
        group = await self.submit([prompt_ids], [params], adapter)
        async with group:
            async for _, out in group:
                yield out

    def abort(self, request_ids: Sequence[str]) -> None:
        """Abort requests (unknown or finished ones are ignored); returns without waiting."""
        ids = list(request_ids)
        try:
            self._post(lambda: self._abort(ids))
        except ShuttingDown:
            pass

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(engine)` on the engine thread between steps and return its result (e.g. embed, stats)."""
        return await asyncio.wrap_future(self._post(lambda: fn(self.engine)))

    def call_sync(self, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        """`call` for code outside an event loop (tests, the CLI)."""
        return self._post(lambda: fn(self.engine)).result(timeout)

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `tps_window_s` seconds (engine thread only)."""
        cutoff = time.monotonic() - self.tps_window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()
        return sum(n for _, n in self._samples) / self.tps_window_s

    async def load_adapter(self, name: str, path: str) -> None:
        """Register a LoRA adapter (a server-side path, never one from a request) on the engine thread."""
        await self.call(lambda e: e.load_adapter(name, path))
        self.adapters = await self.call(lambda e: list(e.adapters))

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Stop admitting requests, let in-flight ones finish for up to `grace_s` seconds, abort the rest, then
        stop the engine thread. Safe to call from any event loop, more than once."""
        self.draining = True
        deadline = time.monotonic() + max(grace_s, 0.0)
        while self._in_flight and time.monotonic() < deadline and self._alive():
            await asyncio.sleep(0.02)
        if self._in_flight and self._alive():
            log.warning("shutdown: aborting %d request(s) still running after %.1fs", self._in_flight, grace_s)
            self._post(lambda: self._abort(None))
            deadline = time.monotonic() + 10.0
            while self._in_flight and time.monotonic() < deadline and self._alive():
                await asyncio.sleep(0.02)
        self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._done.wait, 10.0)

    def close(self) -> None:
        """Stop at once from synchronous code: abort everything and end the thread (no grace period)."""
        self.draining = True
        self._stop = True  # the loop aborts what is left when it leaves
        self._wake.set()
        if self._loop_thread is not None and self._loop_thread is not threading.current_thread():
            self._done.wait(10.0)

    # ---- engine thread
    def _post(self, fn: Callable[[], T]) -> concurrent.futures.Future:
        if self._stop or not self._alive():
            raise ShuttingDown("the engine has stopped")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        self._wake.set()
        return fut

    def _run(self) -> None:
        while True:
            self._wake.clear()
            self._run_commands()
            if self._stop:
                break
            if self.engine.has_unfinished():
                try:
                    outs = self.engine.step()
                except Exception as e:  # noqa: BLE001 - fail the requests, keep serving
                    log.exception("engine step failed")
                    self._end_all(e)
                    continue
                now = time.monotonic()
                self._samples.append((now, sum(len(o.token_ids) for o in outs)))
                while self._samples[0][0] < now - self.tps_window_s:
                    self._samples.popleft()
                self._deliver(outs)
            elif self._sinks:  # requests the engine no longer reports on
                self._end_all()
            else:
                self._wake.wait(0.5)
        self._end_all()
        while True:  # fail commands that arrived too late
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                break
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ShuttingDown("the engine has stopped"))

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _add(self, group: RequestGroup, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
             adapter: str | None) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        waiting = self.engine.stats()["waiting"]
        if waiting >= self.max_queue:
            raise QueueFull(f"the server is busy: {waiting} requests are already waiting (max_queue "
                            f"{self.max_queue}); retry later")
        added: list[str] = []
        try:
            for i, (rid, p, sp) in enumerate(zip(group.ids, prompts, params)):
                self.engine.add_request(list(p), sp, request_id=rid, adapter=adapter)
                added.append(rid)
                self._sinks[rid] = (group, i)
        except BaseException:
            for rid in added:
                self._sinks.pop(rid, None)
                self._engine_abort(rid)
            raise
        finally:
            self._in_flight = len(self._sinks)

    def _deliver(self, outs: list[RequestOutput], error: Exception | None = None) -> None:
        """Hand each output (or `error`, which ends the request) to its request's group: one wake-up per event
        loop per step, so the loop thread holds the GIL as little as possible while the engine computes."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            if out.request_id not in self._sinks:
                continue
            group, i = self._sinks[out.request_id]
            if out.finished or error is not None:
                del self._sinks[out.request_id]
                self._in_flight = len(self._sinks)
            batches.setdefault(group.loop, []).append((group.queue, (i, out if error is None else error)))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

    def _engine_abort(self, rid: str) -> None:
        try:
            self.engine.abort(rid)
        except (KeyError, ValueError):  # finished meanwhile
            pass

    def _abort(self, ids: list[str] | None) -> None:
        """Abort these requests (None: all); the engine reports each with finish_reason "abort" next step."""
        for rid in list(self._sinks) if ids is None else ids:
            if rid in self._sinks:
                self._engine_abort(rid)

    def _end_all(self, error: Exception | None = None) -> None:
        """Abort every request and end its stream now, without another step: with `error`, or with a final
        output whose finish_reason is "abort"."""
        for rid in list(self._sinks):
            self._engine_abort(rid)
            self._deliver([RequestOutput(request_id=rid, token_ids=[], text="", logprobs=None, finished=True,
                                         finish_reason="abort", prompt_tokens=0, completion_tokens=0)], error)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


# ----------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


class _Guard:
    """ASGI middleware run before routing: the bearer key (401), the body size (413) and text that is not Unicode
    (400: a lone surrogate such as "\\ud800" in any string field, which JSON allows and no tokenizer encodes).

    The size is checked on the Content-Length header and again on the bytes actually received (a chunked body
    or a lying header), reading at most `max_body_bytes + 1` bytes; the body is then replayed to the app."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, open_paths: Sequence[str] = ("/health",)):
        self.app, self.api_key, self.max_body_bytes, self.open_paths = app, api_key, max_body_bytes, open_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] not in self.open_paths:
            auth = headers.get("authorization", "")
            scheme, _, key = auth.partition(" ")
            if not auth:
                await self._reply(send, 401, "no API key: send the header 'Authorization: Bearer YOUR_KEY'",
                                  "invalid_api_key")
                return
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                await self._reply(send, 401, "incorrect API key", "invalid_api_key")
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = (f"request body larger than {self.max_body_bytes} bytes (the server's max_body_bytes); "
                   "send less text or fewer inputs")
        length = headers.get("content-length", "0")
        body, more = bytearray(), not length.isdigit() or int(length) <= self.max_body_bytes
        while more:  # the header may be absent (chunked) or lie: count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= self.max_body_bytes
        if len(body) > self.max_body_bytes or not length.isdigit() or int(length) > self.max_body_bytes:
            await self._reply(send, 413, too_big, "request_too_large")
            return
        field = lone_surrogate(bytes(body))
        if field is not None:
            await self._reply(send, 400, f"{field}: the text holds a lone UTF-16 surrogate (such as \\ud800), which "
                              "is not valid Unicode; expected surrogates only in pairs", None, param=field)
            return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reply(send: Callable, status: int, message: str, code: str | None, param: str | None = None) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                     "code": code}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of FastAPI's first validation error, worded for an API user."""
    first = (e.errors() or [{}])[0]
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    if first.get("type") == "json_invalid":
        return f"invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if first.get("type") == "missing":
        return f"missing required field {param!r}", param
    shown = first.get("input")
    found = f", found {repr(shown)[:80]}" if not isinstance(shown, (dict, list, type(None))) else ""
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}{found}", param


def _document_errors_as_answered(app: FastAPI) -> None:
    """FastAPI lists its 422 validation error on every route with a body; this server answers those with 400 in
    OpenAI's shape (ERROR_RESPONSES), so the OpenAPI document drops them."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for operations in build().get("paths", {}).values():
                for op in operations.values():
                    op.get("responses", {}).pop("422", None)
            app.openapi_schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; FastAPI's 422 validation errors become 400 as OpenAI answers."""
    from jinja2 import TemplateError

    bad = (400, "invalid_request_error", None)
    simple = {RequestError: bad, ChatFormatError: bad, TemplateError: bad,
              AdapterNotFound: (404, "invalid_request_error", "model_not_found"),
              QueueFull: (429, "rate_limit_error", "queue_full"), ShuttingDown: (503, "server_error", "shutting_down")}

    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.type, e.param, e.code)

    async def validation(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return error_response(400, message, param=param)

    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        headers = getattr(e, "headers", None)
        message = str(e.detail)
        if e.status_code == 405 and headers and "Allow" in headers:
            message = f"method {request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
        return error_response(e.status_code, message, code=code, headers=headers)

    async def known(_: Request, e: Exception) -> JSONResponse:
        status, kind, code = next(v for k, v in simple.items() if isinstance(e, k))
        message = str(e)
        if isinstance(e, RequestError):  # the engine's parameter name -> the API's
            message = message.replace("max_new_tokens", "max_tokens")
        return error_response(status, message, kind, code=code)

    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed", exc_info=e)
        return error_response(500, f"internal error ({type(e).__name__}); the server log has the details",
                              type="server_error")

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for cls in simple:
        app.add_exception_handler(cls, known)
    app.add_exception_handler(Exception, internal)


# ----------------------------------------------------------------------------- the application

@dataclass
class _Choice:
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


def _finite(x: float) -> float:
    """A JSON-safe log probability (-inf becomes -9999.0, as OpenAI reports impossible tokens)."""
    return x if math.isfinite(x) else -9999.0


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _until_disconnect(request: Request, coro: Any) -> Any:
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


def create_app(async_engine: AsyncEngine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, default_max_tokens: int | None = None) -> FastAPI:
    """The FastAPI app serving `async_engine` as `model_name` (adapters as their own model names).

    `api_key`: when set, every route but /health needs `Authorization: Bearer KEY`. `max_body_bytes`: larger
    bodies get 413. `default_max_tokens`: chat completions without max_tokens stop there (None: at the end of
    the context)."""
    ae, tok = async_engine, tokenizer
    cfg = ae.model_cfg
    vocab = cfg.vocab_size
    started = int(time.time())
    app = FastAPI(title="lmforge", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  responses=ERROR_RESPONSES)
    _document_errors_as_answered(app)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    _install_error_handlers(app)

    def adapter_for(model: str | None) -> str | None:
        """None for the served model; the adapter's name for an adapter; 404 otherwise (names, never paths)."""
        if model is None or model == model_name:
            return None
        if model in ae.adapters:
            return model
        served = [model_name, *ae.adapters]
        raise APIError(404, f"model {model!r} does not exist; this server serves {served}", param="model",
                       code="model_not_found")

    def unsupported(**used: Any) -> None:
        for name, value in used.items():
            if value:
                raise APIError(400, f"{name} is not supported by this server", param=name)

    def need_generation() -> None:
        if cfg.head != "lm" or not cfg.causal:
            raise APIError(400, f"{model_name} is not a causal language model (head {cfg.head!r}); it serves "
                                "/v1/embeddings" + (" and /v1/classify" if cfg.head == "classifier" else ""),
                           param="model")

    def check_ids(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{param} is empty: give at least one token", param=param)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab})", param=param)
        return ids

    def token_lists(x: str | list[str] | list[int] | list[list[int]], param: str) -> list[list[int]]:
        """A text, texts, a token list or token lists (OpenAI's `prompt` / `input`) as token lists."""
        if isinstance(x, str):
            return [tok.encode(x)]
        if not x:
            raise APIError(400, f"{param} is empty", param=param)
        if all(isinstance(t, int) for t in x):
            return [list(x)]
        return [tok.encode(t) if isinstance(t, str) else list(t) for t in x]

    def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
        items = [stop] if isinstance(stop, str) else list(stop or [])
        if len(items) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} stop strings, found {len(items)}", param="stop")
        if any(not s for s in items):
            raise APIError(400, "stop: stop strings must be non-empty", param="stop")
        return tuple(items)

    def sampling(body: GenerationRequest, max_tokens: int, logprobs: int | None, i: int) -> SamplingParams:
        unsupported(logit_bias=body.logit_bias)
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
            repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, seed=None if body.seed is None else body.seed + i,
            stop=stop_strings(body.stop), ignore_eos=body.ignore_eos, logprobs=logprobs)

    def token_str(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    def completion_logprobs(lps: list[TokenLogprob], offset: int, top: bool) -> dict:
        tokens = [token_str(lp.token_id) for lp in lps]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [_finite(lp.logprob) for lp in lps],
                "top_logprobs": [{token_str(t): _finite(v) for t, v in lp.top} for lp in lps] if top else None,
                "text_offset": offsets}

    def chat_logprobs(lps: list[TokenLogprob]) -> dict:
        def entry(t: int, v: float) -> dict:
            s = token_str(t)
            return {"token": s, "logprob": _finite(v), "bytes": list(s.encode("utf-8"))}

        return {"content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top])
                            for lp in lps], "refusal": None}

    async def collect(request: Request, group: RequestGroup, n_choices: int) -> list[_Choice]:
        choices = [_Choice() for _ in range(n_choices)]

        async def run() -> None:
            async with group:
                async for i, out in group:
                    choices[i].add(out)

        await _until_disconnect(request, run())
        return choices

    def usage_of(choices: list[_Choice], n: int) -> dict[str, int]:
        """Prompt tokens once per prompt (choice i * n), completion tokens of every choice."""
        return _usage(sum(c.prompt_tokens for c in choices[::n]), sum(c.completion_tokens for c in choices))

    async def event_stream(group: RequestGroup, n: int, head: dict, include_usage: bool,
                           chunk: Callable[[int, RequestOutput], dict | None],
                           first: Callable[[int], dict] | None = None) -> AsyncIterator[str]:
        """SSE events: per choice an optional opening chunk, then one chunk per output with news, the usage
        chunk when asked, and [DONE]. Leaving early (client gone → cancelled) aborts the requests."""
        totals = [[0, 0] for _ in group.ids]
        try:
            async with group:
                for i in range(len(group.ids) if first is not None else 0):
                    yield _sse(first(i))
                async for i, out in group:
                    if out.finished:
                        totals[i] = [out.prompt_tokens, out.completion_tokens]
                    c = chunk(i, out)
                    if c is not None:
                        yield _sse(c)
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in-band, as OpenAI does
            log.exception("stream failed")
            yield _sse({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None,
                                  "code": None}})
            return
        if include_usage:
            yield _sse(dict(head, choices=[], usage=_usage(sum(t[0] for t in totals[::n]), sum(t[1] for t in totals))))
        yield "data: [DONE]\n\n"

    def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- routes
    @app.get("/health")
    async def health() -> Response:
        if ae.draining:
            return error_response(503, "the server is shutting down", type="server_error", code="shutting_down")
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        entry = {"id": model_name, "object": "model", "created": started, "owned_by": "lmforge"}
        return JSONResponse({"object": "list", "data": [entry] + [
            {"id": a, "object": "model", "created": started, "owned_by": "lmforge", "parent": model_name}
            for a in ae.adapters]})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        adapter = adapter_for(body.model)
        need_generation()
        unsupported(echo=body.echo, suffix=body.suffix, best_of=body.best_of not in (None, 1, body.n))
        prompts = [check_ids(x, "prompt") for x in token_lists(body.prompt, "prompt")]
        n = body.n
        if len(prompts) * n > MAX_SEQUENCES:
            raise APIError(400, f"{len(prompts)} prompts x n={n} exceeds {MAX_SEQUENCES} sequences per request",
                           param="n")
        max_tokens = body.max_tokens
        params = []
        for ids in prompts:
            mt = max_tokens if max_tokens is not None else max(ae.max_context - len(ids), 1)
            params += [sampling(body, mt, body.logprobs, i) for i in range(n)]
        group = await ae.submit([ids for ids in prompts for _ in range(n)], params, adapter)
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
                    lp = completion_logprobs(out.logprobs, offsets[i], top)
                    offsets[i] += sum(len(s) for s in lp["tokens"])
                choice = {"index": i, "text": out.text, "logprobs": lp,
                          "finish_reason": out.finish_reason if out.finished else None}
                return dict(head, choices=[choice], **({"usage": None} if include_usage else {}))

            return sse_response(event_stream(group, n, head, include_usage, chunk))
        choices = await collect(request, group, len(params))
        return JSONResponse(dict(head, choices=[
            {"index": i, "text": c.text, "finish_reason": c.finish_reason,
             "logprobs": completion_logprobs(c.logprobs or [], 0, top) if body.logprobs is not None else None}
            for i, c in enumerate(choices)], usage=usage_of(choices, n)))

    def chat_prompt(body: ChatCompletionRequest) -> list[int]:
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
        return check_ids(encode_chat(tok, messages, add_generation_prompt=True).ids, "messages")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        adapter = adapter_for(body.model)
        need_generation()
        ids = chat_prompt(body)
        room = ae.max_context - len(ids)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            if room < 1:
                raise APIError(400, f"the conversation ({len(ids)} tokens) fills the context length "
                                    f"{ae.max_context}; shorten it", param="messages")
            max_tokens = min(room, default_max_tokens or room)
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        n = body.n
        params = [sampling(body, max_tokens, top if body.logprobs else None, i) for i in range(n)]
        group = await ae.submit([ids] * n, params, adapter)
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
                lp = chat_logprobs(out.logprobs) if body.logprobs and out.logprobs else None
                choice = {"index": i, "delta": {"content": out.text} if out.text else {}, "logprobs": lp,
                          "finish_reason": out.finish_reason if out.finished else None}
                return dict(head, choices=[choice], **extra)

            return sse_response(event_stream(group, n, head, include_usage, chunk, first))
        choices = await collect(request, group, n)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "logprobs": chat_logprobs(c.logprobs or []) if body.logprobs else None,
                         "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": usage_of(choices, n)})

    def base_only(model: str | None) -> None:
        if adapter_for(model) is not None:
            raise APIError(400, f"adapter {model!r} applies to text generation only; use {model_name!r}",
                           param="model")

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Response:
        base_only(body.model)
        if cfg.causal:
            raise APIError(400, f"{model_name} is a decoder-only (causal) model; embeddings need an encoder model "
                                "such as all-minilm-l6-v2", param="model")
        batch = token_lists(body.input, "input")
        if len(batch) > MAX_INPUTS:
            raise APIError(400, f"input: at most {MAX_INPUTS} inputs per request, found {len(batch)}", param="input")
        if body.dimensions is not None and body.dimensions != cfg.hidden_size:
            raise APIError(400, f"dimensions: this model gives {cfg.hidden_size}, found {body.dimensions}",
                           param="dimensions")
        for k, ids in enumerate(batch):
            check_ids(ids, "input")
            if len(ids) > ae.max_context:
                raise APIError(400, f"input {k} has {len(ids)} tokens, more than the context length "
                                    f"{ae.max_context}", param="input")
        vectors = []
        for s in range(0, len(batch), EMBED_CHUNK):
            part = batch[s:s + EMBED_CHUNK]
            vectors += (await ae.call(lambda e, part=part: e.embed(part, normalize=True))).float().cpu()
        data = []
        for i, v in enumerate(vectors):
            emb: Any = (base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
                        if body.encoding_format == "base64" else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        used = sum(map(len, batch))
        return JSONResponse({"object": "list", "data": data, "model": body.model,
                             "usage": {"prompt_tokens": used, "total_tokens": used}})

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> Response:
        from ..data.classify import ClassifyExample, tokenize_examples

        base_only(body.model)
        if cfg.head != "classifier":
            raise APIError(400, f"{model_name} has a {cfg.head!r} head; /v1/classify needs a classifier model",
                           param="model")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise APIError(400, "input is empty", param="input")
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"input: at most {MAX_INPUTS} texts per request, found {len(texts)}", param="input")
        examples = [ClassifyExample(where=f"input {i}", text=t, text_pair=None, label=0) for i, t in enumerate(texts)]
        tokenized, _ = tokenize_examples(examples, tok, ae.max_context)
        ids = [e.input_ids for e in tokenized]
        logits = (await ae.call(lambda e: e.classify(ids))).float().cpu()  # (B, K)
        names = cfg.id2label or {i: str(i) for i in range(logits.shape[-1])}
        results = []
        for text, row in zip(texts, logits):
            if row.numel() == 1:
                results.append({"input": text, "output": row.item(), "scores": None})
            else:
                probs = row.softmax(-1)
                results.append({"input": text, "output": names[int(probs.argmax())],
                                "scores": {names[i]: round(p, 6) for i, p in enumerate(probs.tolist())}})
        return JSONResponse({"output": results[0]["output"]} if isinstance(body.input, str) else results)

    @app.get("/metrics")
    async def metrics() -> Response:
        stats, tps = await ae.call(lambda e: (e.stats(), ae.tokens_per_second()))
        stats["tokens_per_second"] = round(tps, 3)
        text = "".join(f"# HELP lmforge_{name} {doc}\n# TYPE lmforge_{name} {kind}\nlmforge_{name} {stats[key]}\n"
                       for name, key, kind, doc in METRICS)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    return app


# ----------------------------------------------------------------------------- running it

@dataclass
class RunningServer:
    """A uvicorn server running in a background thread (see `start_server`)."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting connections, finish open ones (uvicorn's own grace) and join the thread."""
        self.server.should_exit = True
        self.thread.join(timeout)


def start_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
                 timeout_s: float = 30.0) -> RunningServer:
    """Serve `app` with uvicorn in a background thread (port 0 picks a free port); returns once it listens.

    Shortens the interpreter's thread switch interval (5 ms -> 0.5 ms): the engine thread re-takes the GIL after
    every tensor op, and must not wait a whole interval behind the HTTP thread each time."""
    sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmforge-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.01)
    return RunningServer(server, thread, host, port)


def serve(app: FastAPI, async_engine: AsyncEngine, host: str = "127.0.0.1", port: int = 8000,
          grace_s: float = 30.0, log_level: str = "info", on_started: Callable[[RunningServer], None] | None = None
          ) -> None:
    """Serve until SIGINT / SIGTERM, then shut down gracefully: new requests get 503 while in-flight ones finish
    for up to `grace_s` seconds; the rest are aborted. A second signal aborts at once. HTTP runs in a background
    thread; an engine made with background=False runs its loop here (the main thread, where PyTorch is fast)."""
    running = start_server(app, host, port, log_level)
    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    stopping = threading.Event()
    http_died = threading.Event()

    def drain() -> None:
        log.info("shutting down: finishing in-flight requests for up to %.0fs", grace_s)
        asyncio.run(async_engine.shutdown(grace_s))

    def first_signal(signum: int, _frame: Any) -> None:
        for s in handled:  # a second signal interrupts the grace period
            signal.signal(s, signal.default_int_handler)
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=drain, name="lmforge-drain", daemon=True).start()

    def watch_http() -> None:
        while not stopping.is_set() and running.thread.is_alive():
            time.sleep(0.2)
        if not stopping.is_set():
            http_died.set()
            stopping.set()
            async_engine.close()

    previous = {s: signal.signal(s, first_signal) for s in handled} if in_main else {}
    threading.Thread(target=watch_http, name="lmforge-watch", daemon=True).start()
    try:
        if on_started is not None:
            on_started(running)
        if async_engine.background:
            async_engine.wait_stopped()
        else:
            async_engine.run()  # until drain() or close() stops it
        if http_died.is_set():
            raise RuntimeError("the HTTP server stopped unexpectedly")
    except KeyboardInterrupt:
        running.server.force_exit = True
        async_engine.close()
        raise
    finally:
        stopping.set()
        running.stop()
        async_engine.close()
        for s, h in previous.items():
            signal.signal(s, h)
