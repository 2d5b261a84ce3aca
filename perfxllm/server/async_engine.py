"""The engine, for asyncio code: requests in, each as a RequestStream of its outputs.

The engine runs in its own process (`spawn`, as `perfxllm serve` does) or on a thread of this one (`on_thread`,
around an Engine built here); see engine_process. Either way this side talks to it over a socket with
asyncio: commands batched into one message per turn of the event loop, and a task that reads each result and
hands its outputs to their streams. Nothing blocks the event loop and no thread has to wake it.

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
import multiprocessing
import socket
import threading
import time
from collections import deque
from multiprocessing.process import BaseProcess
from typing import Any

from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine, RequestOutput
from perfxllm.errors import PerfxError, RequestError
from perfxllm.sampling_params import SamplingParams
from perfxllm.server.engine_process import (
    EXIT,
    STOP,
    Abort,
    Add,
    EngineInfo,
    EngineLoop,
    LoadFailed,
    StepResult,
    frame,
    read_message,
    recv_message,
    run_engine_process,
)
from perfxllm.server.metrics import EngineStats, Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


class EngineStopped(Exception):
    pass


class AsyncEngine:
    def __init__(
        self, sock: socket.socket, info: EngineInfo, max_queue: int, worker: BaseProcess | threading.Thread
    ) -> None:
        self.info, self.max_queue, self.worker = info, max_queue, worker
        self.metrics = Metrics(info.labels)
        self.stats = EngineStats()  # the engine's state after its latest turn
        self.num_in_flight = 0  # engine requests admitted and not yet done
        self._sock = sock
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._targets: dict[str, tuple[RequestStream, int]] = {}  # request id -> (stream, choice index)
        self._outbox: list[Any] = []  # commands for the engine, sent at the end of this turn of the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False  # no new requests
        self._engine_gone = False

    @classmethod
    def spawn(cls, config: EngineConfig, max_queue: int) -> AsyncEngine:
        """Start the engine in a new process; return once it has loaded the model."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        ours, theirs = socket.socketpair()
        process = ctx.Process(target=run_engine_process, args=(config, theirs), name="perfxllm-engine")
        process.start()
        theirs.close()
        try:
            info = recv_message(ours)
        except EOFError:
            process.join()
            raise PerfxError(
                f"the engine process exited (code {process.exitcode}) before the model was loaded"
            ) from None
        except BaseException:  # Ctrl-C while the model loads
            process.kill()
            raise
        if isinstance(info, LoadFailed):
            process.join()
            raise PerfxError(info.message)
        return cls(ours, info, max_queue, process)

    @classmethod
    def on_thread(cls, engine: Engine, max_queue: int) -> AsyncEngine:
        """Run `engine` on a thread of this process: from here on only that thread touches it."""
        ours, theirs = socket.socketpair()
        thread = threading.Thread(target=EngineLoop(engine, theirs).run, name="perfxllm-engine", daemon=True)
        thread.start()
        return cls(ours, EngineInfo.of(engine), max_queue, thread)

    # -- lifetime ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Talk to the engine from the running event loop."""
        self._loop = asyncio.get_running_loop()
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._reader_task = asyncio.create_task(self._receive(reader))
        self._flush()

    def stop(self) -> None:
        """Fail every request in flight and refuse new ones. Safe to call from a signal handler."""
        self._stopped = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._abort_all)

    async def close(self) -> None:
        """Stop, then end the engine (once no request can arrive any more)."""
        self._stopped = True
        self._abort_all()
        self._command(EXIT)
        self._flush()
        if self._writer is not None:
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()
        await asyncio.to_thread(self.worker.join, 60)
        if isinstance(self.worker, BaseProcess) and self.worker.is_alive():
            log.warning("the engine process did not exit in 60 s; killing it")
            self.worker.kill()
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()

    @property
    def alive(self) -> bool:
        return not (self._stopped or self._engine_gone) and self.worker.is_alive()

    # -- requests --------------------------------------------------------------------------------------------
    def submit(
        self, request_id: str, prompts: list[list[int]], params: list[SamplingParams]
    ) -> RequestStream:
        if self._stopped or self._engine_gone:
            raise EngineStopped("the server is shutting down" if self._stopped else "the engine has stopped")
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
        for i, (rid, prompt, p) in enumerate(zip(stream.request_ids, prompts, params)):
            self.metrics.prompt_tokens += len(prompt)
            self._targets[rid] = (stream, i)
            self._command(Add(rid, prompt, p))
        return stream

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._targets.pop(rid, None)
        self._command(Abort(request_ids))

    def _abort_all(self) -> None:
        self._fail_all(EngineStopped("the server is shutting down"))
        self._command(STOP)

    def _fail_all(self, error: Exception) -> None:
        targets, self._targets = self._targets, {}
        for stream, index in targets.values():
            stream.put(index, error)

    # -- the connection --------------------------------------------------------------------------------------
    def _command(self, command: Any) -> None:
        self._outbox.append(command)
        if len(self._outbox) == 1 and self._loop is not None:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send the commands of this turn as one message (buffered by the transport: nothing waits)."""
        if self._writer is None or not self._outbox or self._engine_gone:
            return
        commands, self._outbox = self._outbox, []
        self._writer.write(frame(commands))

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                self._deliver(await read_message(reader))
        except Exception as e:
            if not isinstance(e, (asyncio.IncompleteReadError, ConnectionError)):  # not the engine's exit
                log.exception("reading the engine's results failed")
            self._engine_gone = True
            if not self._stopped:
                log.error("the engine stopped; failing the %d requests in flight", len(self._targets))
            self._fail_all(EngineStopped("the engine has stopped"))

    def _deliver(self, result: StepResult) -> None:
        self.stats = result.stats
        targets = self._targets
        for out in result.outputs:
            target = targets.pop(out.request_id, None) if out.finished else targets.get(out.request_id)
            if target is not None:
                target[0].put(target[1], out)
        for rid, error in result.failed:
            target = targets.pop(rid, None)
            if target is not None:
                target[0].put(target[1], error)


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
