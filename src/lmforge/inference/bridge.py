"""The engine's bridge to asyncio: `AsyncEngine` runs the (not thread-safe) `Engine` in one thread and hands each
request's outputs to the asyncio task that asked for them, as a `RequestGroup`; `QueueFull` and `ShuttingDown` are
how it refuses a request. It knows nothing of HTTP (see `inference/http.py` and `inference/routes.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections import deque
from typing import Any, AsyncIterator, Callable, Sequence, TypeVar

from .request import RequestOutput
from .sampling import SamplingParams

__all__ = ["AsyncEngine", "RequestGroup", "QueueFull", "ShuttingDown"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFull(Exception):
    """The engine already has `max_queue` requests waiting for a batch slot (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is draining and admits no new requests (HTTP 503)."""


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
    sleeps on an event. Every engine call happens on that thread, since the engine is not thread-safe.

    It steps the engine itself rather than through `Engine.stream`, which follows one group of requests added
    together until they finish: here requests join and leave between any two steps, a failed step must end only
    the requests in flight, and an idle engine waits for commands instead of ending."""

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
