"""`AsyncLLMEngine`: the synchronous `LLMEngine` behind an asyncio interface, for the HTTP server.

Why one thread. The engine is a plain object with no locks: its scheduler, block tables and prefix cache
must only ever be touched by one thread. A single worker thread therefore owns it, and every other
thread talks to it through a command inbox under one condition variable: add a request, abort one, run a
function on the engine (embeddings, stats), or stop. The thread steps the engine while any request is
unfinished and sleeps on the condition variable otherwise, so an idle server burns no CPU.

Each request gets an `asyncio.Queue` on the event loop that asked for it; the worker pushes every
`RequestOutput` into it with `loop.call_soon_threadsafe`, so the HTTP side simply iterates
`async for output in engine.generate(...)`. Leaving that loop early (a client disconnect cancels the
streaming task) aborts the request, which frees its KV blocks at the next turn of the worker.

Shutdown with `drain=True` refuses new requests and lets the ones in flight finish before the thread
exits; `drain=False` aborts them.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.errors import LMForgeError
from ..infer.engine import LLMEngine
from ..infer.request import RequestOutput, SamplingParams

_log = logging.getLogger("lmforge.serve")


class EngineClosedError(LMForgeError):
    """The engine is shutting down (or has stopped) and takes no new requests."""


class EngineStepError(LMForgeError):
    """A model step failed; the requests in that step were aborted (the engine keeps serving)."""


@dataclass
class EngineSnapshot:
    """What /metrics and /health report, published by the worker after each turn (read without locks)."""

    num_waiting: int = 0
    num_running: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0
    prefix_hit_rate: float = 0.0
    num_steps: int = 0
    num_preemptions: int = 0
    alive: bool = False

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks


_ABORTED = object()   # pushed into a request's queue when the engine dropped it without a final output
_ADMITTED = object()  # the first item of every accepted request's queue


class _Stream:
    """The asyncio side of one request: its queue and the loop that owns the queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the client's loop is closed: nobody is listening any more
            pass


def _put_many(loop: asyncio.AbstractEventLoop, items: list[tuple[_Stream, Any]]) -> None:
    """Deliver a step's outputs to their queues with one cross-thread call (each call writes the loop's
    self-pipe: with 32 streams, 32 syscalls and wake-ups per step cost more than the step's model time)."""
    def deliver() -> None:
        for stream, item in items:
            stream.queue.put_nowait(item)
    try:
        loop.call_soon_threadsafe(deliver)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


class RequestStream:
    """The outputs of one accepted request: `async for output in stream`; `aclose()` aborts it if unfinished
    (a plain class, not an async generator, so closing works even before iteration started)."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str, stream: _Stream):
        self.engine = engine
        self.request_id = request_id
        self._stream = stream

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        stream = self._stream
        if stream.finished:
            raise StopAsyncIteration
        try:
            item = await stream.queue.get()
        except BaseException:  # cancelled (client gone): abort
            await self.aclose()
            raise
        if item is _ABORTED:
            stream.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            stream.finished = True
            raise item
        if item.finished:
            stream.finished = True
        return item

    async def aclose(self) -> None:
        if not self._stream.finished:
            self._stream.finished = True
            self.engine.abort(self.request_id)


class AsyncLLMEngine:
    """Serve `LLMEngine` requests from asyncio code (see the module docstring)."""

    def __init__(self, engine: LLMEngine, on_finished: Callable[[RequestOutput], None] | None = None):
        """on_finished: called in the worker thread with each request's final output (metrics hook)."""
        self.engine = engine
        self.on_finished = on_finished
        self._cv = threading.Condition()
        self._adds: list[tuple[str, Any, SamplingParams, dict, _Stream]] = []
        self._aborts: list[str] = []
        self._calls: list[tuple[Callable[[LLMEngine], Any], asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._streams: dict[str, _Stream] = {}    # worker-owned after admission
        self._accepting = True
        self._stop = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self.crashed: str | None = None   # why the worker died, if it did
        self.snapshot = EngineSnapshot(num_blocks=engine.blocks.num_blocks,
                                       num_free_blocks=engine.blocks.num_free_blocks)

    # ---- life cycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cv:
            if self._thread is not None and self._thread.is_alive():
                return
            if self._stop:
                raise EngineClosedError("the engine was shut down; build a new AsyncLLMEngine")
            self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
            self._thread.start()
            self.snapshot.alive = True

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop taking requests; finish (drain) or abort the ones in flight; join the worker.
        Returns False when the worker was still busy after `timeout` seconds."""
        with self._cv:
            self._accepting = False
            self._stop = True
            self._drain = drain
            self._cv.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    async def shutdown_async(self, drain: bool = True, timeout: float | None = None) -> bool:
        return await asyncio.to_thread(self.shutdown, drain, timeout)

    # ---- requests -------------------------------------------------------------------------------------

    async def submit(self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None,
                     **request_kwargs: Any) -> RequestStream:
        """Queue a request and wait until the engine has accepted it, so what `add_request` refuses (a bad
        schema, an unknown adapter, a prompt that is too long) raises here, before any response starts.
        Returns the request's output stream; closing it early aborts the request."""
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop())
        with self._cv:
            if not self._accepting:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            self._adds.append((request_id, prompt, params, request_kwargs, stream))
            self._cv.notify_all()
        self.start()
        try:
            first = await stream.queue.get()
        except BaseException:  # cancelled while waiting: do not leave the request running
            self.abort(request_id)
            raise
        if isinstance(first, BaseException):
            raise first
        return RequestStream(self, request_id, stream)

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None,
                       **request_kwargs: Any) -> AsyncIterator[RequestOutput]:
        """Every RequestOutput of one request, the last one finished (`submit` + iterate)."""
        outputs = await self.submit(prompt, params, request_id, **request_kwargs)
        try:
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()

    def abort(self, request_id: str) -> None:
        """Ask the worker to abort a request (thread-safe; unknown ids are ignored)."""
        with self._cv:
            self._aborts.append(request_id)
            self._cv.notify_all()

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` in the worker thread between steps and return its result (embeddings use it:
        the model is never run by two threads at once)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            if self._stop and not self.is_running:
                raise EngineClosedError("the engine has stopped")
            self._calls.append((fn, loop, future))
            self._cv.notify_all()
        self.start()
        return await future

    # ---- the worker -----------------------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._adds or self._aborts or self._calls or self.engine.has_unfinished_requests())

    @property
    def healthy(self) -> bool:
        """Accepting requests, and the worker is alive (or not started yet)."""
        return self._accepting and self.crashed is None and (self.is_running or self._thread is None)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug in the loop itself: fail everything pending, report unhealthy
            self.crashed = f"{type(e).__name__}: {e}"
            with self._cv:
                self._accepting = False
                adds, self._adds = self._adds, []
                calls, self._calls = self._calls, []
            error = EngineStepError(f"the engine thread stopped: {self.crashed}")
            for *_, stream in adds:
                stream.put(error)
            for stream in self._streams.values():
                stream.put(error)
            for _, loop, future in calls:
                loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_exception(error))
            self.snapshot.alive = False
            _log.exception("lmforge engine thread stopped")

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cv:
                while not self._has_work() and not self._stop:
                    self._cv.wait()
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                calls, self._calls = self._calls, []
                stopping, drain = self._stop, self._drain
            for request_id, prompt, params, kwargs, stream in adds:  # adds first: an abort may follow its add
                self._admit(request_id, prompt, params, kwargs, stream)
            for request_id in aborts:
                self._abort_now(request_id)
            for fn, loop, future in calls:
                self._run_call(fn, loop, future)
            if stopping and not drain:
                for request_id in list(self._streams):
                    self._abort_now(request_id)
            if engine.has_unfinished_requests():
                self._step()
            self._publish()
            time.sleep(0)  # hand the GIL to the event loop between steps, so outputs go out as they come
            if stopping and not engine.has_unfinished_requests():
                with self._cv:
                    if not (self._adds or self._aborts or self._calls):
                        self.snapshot.alive = False
                        return

    def _admit(self, request_id: str, prompt: Any, params: SamplingParams, kwargs: dict, stream: _Stream) -> None:
        try:
            self.engine.add_request(prompt, params, request_id, **kwargs)
        except Exception as e:  # a bad request must not take the worker down: hand the error back
            stream.put(e)
            return
        self._streams[request_id] = stream
        stream.put(_ADMITTED)

    def _abort_now(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        request = self.engine.requests.get(request_id)
        if request is not None:
            output = request.make_output()
            self.engine.abort(request_id)
            if self.on_finished is not None:
                for completion in output.outputs:
                    completion.finish_reason = completion.finish_reason or "abort"
                self._notify_finished(output)
        if stream is not None:
            stream.put(_ABORTED)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # fail the requests in flight, keep the engine serving the next ones
            error = EngineStepError(f"the model step failed: {type(e).__name__}: {e}")
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
                stream = self._streams.pop(request_id, None)
                if stream is not None:
                    stream.put(error)
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
                self._notify_finished(output)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():  # one wake-up of each event loop per step, not one per request
            _put_many(loop, items)

    def _notify_finished(self, output: RequestOutput) -> None:
        if self.on_finished is None:
            return
        try:
            self.on_finished(output)
        except Exception:  # a metrics hook must never stop generation
            pass

    def _run_call(self, fn: Callable[[LLMEngine], Any], loop: asyncio.AbstractEventLoop,
                  future: asyncio.Future) -> None:
        result, error = None, None
        try:
            result = fn(self.engine)
        except Exception as e:  # noqa: BLE001 - handed back to the caller
            error = e

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _publish(self) -> None:
        engine = self.engine
        stats = engine.stats()
        self.snapshot = EngineSnapshot(
            num_waiting=len(engine.waiting), num_running=len(engine.running), num_blocks=engine.blocks.num_blocks,
            num_free_blocks=engine.blocks.num_free_blocks, prefix_hit_rate=stats.prefix_hit_rate,
            num_steps=stats.num_steps, num_preemptions=stats.num_preemptions, alive=True,
        )


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll `predicate` until true or `timeout` seconds passed (tests and shutdown use it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
