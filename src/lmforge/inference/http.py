"""The HTTP shell around the routes: OpenAI-shaped errors (`APIError`, `error_response`, `install_error_handlers`),
the guard that runs before routing (API key, body size, lone surrogates), the OpenAPI tweak, and running an app
under uvicorn (`start_server` in a thread, `serve` until SIGINT / SIGTERM with a graceful drain).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"the lmforge server needs FastAPI and uvicorn ({e.name} is missing): "
                      "pip install 'lmforge[serve]'") from e

from ..tokenizer.chat import ChatFormatError
from .bridge import AsyncEngine, QueueFull, ShuttingDown
from .protocol import lone_surrogate
from .request import AdapterNotFound
from .sampling import RequestError

__all__ = ["APIError", "error_response", "RequestGuard", "install_error_handlers", "document_errors_as_answered",
           "RunningServer", "start_server", "serve"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answer in OpenAI's shape."""
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


class RequestGuard:
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


def document_errors_as_answered(app: FastAPI) -> None:
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


def install_error_handlers(app: FastAPI) -> None:
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
