"""The Engine on a background thread, for asyncio code.

Only the engine thread ever touches the Engine. The event loop hands it commands (add, abort, stop) through
a thread-safe inbox; the engine thread hands a step's outputs to their streams in one
loop.call_soon_threadsafe (not one per output: 256 streams would be 256 wake-ups a step). With nothing to
run, the engine thread blocks on the inbox instead of spinning.

A stream whose reader falls behind (many streams on a busy event loop) reads the outputs that have piled up
for a choice as one: one chunk of several tokens instead of several chunks, as vLLM does, so the event loop's
work per step shrinks as it falls behind instead of the backlog growing.

An API request (n choices, or several prompts) is one RequestStream of several engine requests. It is
admitted, or refused with QueueFull, at once on the event loop, so the queue limit holds exactly. Closing
a stream before it ends (client gone, error) aborts its engine requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from perfxllm.engine.engine import Engine, RequestOutput
from perfxllm.errors import RequestError
from perfxllm.sampling_params import SamplingParams
from perfxllm.server.metrics import EngineStats, Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


@dataclass
class _Target:
    """Where a request's outputs go: choice `index` of `stream`, read on `loop`."""

    loop: asyncio.AbstractEventLoop
    stream: RequestStream
    index: int


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    target: _Target


@dataclass
class _Abort:
    request_ids: list[str]


_STOP = object()  # fail the requests in flight; refuse new ones from now on
_EXIT = object()  # end the engine thread


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics) -> None:
        self._engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.stats = EngineStats()  # replaced (never mutated) by the engine thread
        self.num_in_flight = 0  # engine requests admitted and not yet done, counted on the event loop
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._targets: dict[str, _Target] = {}  # engine thread only
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="perfxllm-engine", daemon=True)

    # -- event loop side ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fail every request in flight and refuse new ones. Safe to call from a signal handler."""
        self._stopped = True
        self._inbox.put(_STOP)

    async def close(self) -> None:
        """Stop, then end the engine thread (once no request can arrive any more)."""
        self.stop()
        self._inbox.put(_EXIT)
        await asyncio.to_thread(self._thread.join, 60)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    @property
    def native_thread_id(self) -> int | None:
        return self._thread.native_id

    def submit(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> RequestStream:
        if self._stopped:
            raise EngineStopped("the server is shutting down")
        if len(prompts) > self.max_queue:
            raise RequestError(
                f"the request needs {len(prompts)} sequences; this server runs at most {self.max_queue}"
            )
        if self.num_in_flight + len(prompts) > self.max_queue:
            raise QueueFull(
                f"the server has {self.num_in_flight} requests in flight and takes at most {self.max_queue}"
            )
        stream = RequestStream(self, [f"{request_id}-{i}" for i in range(len(prompts))])
        self.num_in_flight += len(prompts)
        loop = asyncio.get_running_loop()
        for i, (rid, prompt, p) in enumerate(zip(stream.request_ids, prompts, params)):
            self.metrics.prompt_tokens += len(prompt)
            self._inbox.put(_Add(rid, prompt, p, _Target(loop, stream, i)))
        return stream

    def abort(self, request_ids: list[str]) -> None:
        self._inbox.put(_Abort(request_ids))

    # -- engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("the engine thread died")
            self._stopped = True
            self._fail_all(EngineStopped("the engine thread died"))

    def _loop(self) -> None:
        while True:
            commands = [self._inbox.get()] if not self._engine.has_unfinished() else []
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                self._apply(command)
            if _EXIT in commands:
                return
            if self._engine.has_unfinished():
                self._step()
            self._publish_stats()

    def _apply(self, command: Any) -> None:
        if command is _STOP:
            self._fail_all(EngineStopped("the server is shutting down"))
        elif isinstance(command, _Abort):
            for rid in command.request_ids:
                if self._targets.pop(rid, None) is not None:
                    self._engine.abort(rid)
        elif isinstance(command, _Add):
            if self._stopped:
                _send([(command.target, EngineStopped("the server is shutting down"))])
                return
            try:
                self._engine.add_request(command.prompt_ids, command.params, command.request_id)
            except Exception as e:  # RequestError, or a bug: either way only this request fails
                _send([(command.target, e)])
                return
            self._targets[command.request_id] = command.target

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the %d requests in flight", len(self._targets))
            self._fail_all(RuntimeError(f"the engine failed: {type(e).__name__}: {e}"))
            return
        sends = []
        for out in outputs:
            get = self._targets.pop if out.finished else self._targets.get
            target = get(out.request_id, None)
            if target is not None:
                sends.append((target, out))
        _send(sends)

    def _fail_all(self, error: Exception) -> None:
        _send([(target, error) for target in self._targets.values()])
        for rid in self._targets:
            try:
                self._engine.abort(rid)
            except Exception:
                log.exception("could not abort %s", rid)
        self._targets.clear()

    def _publish_stats(self) -> None:
        e = self._engine
        self.stats = EngineStats(
            num_waiting=len(e.scheduler.waiting),
            num_running=len(e.scheduler.running),
            kv_cache_usage=e.block_manager.usage,
            prefix_cache_queries=e.block_manager.prefix_queries,
            prefix_cache_hits=e.block_manager.prefix_hits,
            num_preemptions=e.scheduler.num_preemptions,
        )


def _send(items: list[tuple[_Target, RequestOutput | Exception]]) -> None:
    """Hand outputs to their streams: one call onto each event loop (there is one, in practice)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Target, RequestOutput | Exception]]] = {}
    for target, item in items:
        by_loop.setdefault(target.loop, []).append((target, item))
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[_Target, RequestOutput | Exception]]) -> None:
    for target, item in batch:
        target.stream.put(target.index, item)


def _merge(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: the text and tokens of both, the state of the later."""
    return dataclasses.replace(
        later,
        text=first.text + later.text,
        token_ids=first.token_ids + later.token_ids,
        logprobs=first.logprobs + later.logprobs,
    )


class RequestStream:
    """The outputs of one API request's engine requests, as (choice index, RequestOutput), in arrival order.
    Iterate it to the end, or close() it: either way it leaves the engine."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str]) -> None:
        self.engine, self.request_ids = engine, request_ids
        self._pending: deque[tuple[int, RequestOutput | Exception]] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the reader's, while it waits for an output
        self.unfinished = set(range(len(request_ids)))
        self.start = time.perf_counter()
        self.first_token_at: list[float | None] = [None] * len(request_ids)
        self.closed = False

    def put(self, index: int, item: RequestOutput | Exception) -> None:
        """On the event loop: an output (or the error that ends it) of choice `index`."""
        self._pending.append((index, item))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self.unfinished:
            raise StopAsyncIteration
        while not self._pending:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        index, out = self._pending.popleft()
        if isinstance(out, Exception):
            self.close("error")
            raise out
        while self._pending and self._pending[0][0] == index and not out.finished:
            later = self._pending[0][1]
            if isinstance(later, Exception):
                break
            self._pending.popleft()
            out = _merge(out, later)
        self._observe(index, out)
        if out.finished:
            self.unfinished.discard(index)
            if not self.unfinished:
                self.close()
        return index, out

    def _observe(self, index: int, out: RequestOutput) -> None:
        metrics, now = self.engine.metrics, time.perf_counter()
        first = self.first_token_at[index] = self.first_token_at[index] or now
        metrics.generation_tokens += len(out.token_ids)
        if out.finished:
            metrics.finished[out.finish_reason] += 1
            metrics.ttft.observe(first - self.start)
            metrics.e2e.observe(now - self.start)
            if out.num_output_tokens > 1:
                metrics.tpot.observe((now - first) / (out.num_output_tokens - 1))

    def close(self, reason: str = "abort") -> None:
        """Abort what has not finished (recorded under `reason`) and give back the queue slots. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.engine.num_in_flight -= len(self.request_ids)
        if self.unfinished:
            self.engine.abort([self.request_ids[i] for i in self.unfinished])
            self.engine.metrics.finished[reason] += len(self.unfinished)
