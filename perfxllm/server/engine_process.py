"""The engine loop behind the HTTP server: the Engine in a process of its own (`perfxllm serve`), or on a
thread beside an Engine built in this process, talking to the event loop over one connection either way.

Why a process: the event loop (HTTP, one SSE chunk per token and stream) and the engine (scheduling,
sampling, detokenising) are both Python, and on one interpreter they take turns holding the GIL: at hundreds
of streams the engine's next step waited on the chunks of its last. vLLM V1 and SGLang split them the same way.

The connection is a Unix socket pair; a message is a frame: its length (8 bytes) and its pickle (both ends
are this program, over a socket no one else holds). Front end to engine: lists of Add, Abort, STOP (abort
every request) and EXIT. Engine to front end: EngineInfo (or LoadFailed) once, then a StepResult after every
turn of the loop: the step's outputs, the requests that failed, and the engine's state for /metrics. The
engine reads what has arrived between steps and sends each result whole (no threads to contend with it for
the GIL); the front end reads and writes with asyncio, so a step never waits on the event loop's turn.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import select
import signal
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine, RequestOutput, device_tag
from perfxllm.errors import PerfxError, RequestError
from perfxllm.info import quant_label
from perfxllm.model.tokenizer import Tokenizer
from perfxllm.sampling_params import SamplingParams
from perfxllm.server.metrics import EngineStats

log = logging.getLogger(__name__)

FRAME_HEADER = struct.Struct("!Q")  # the length of the pickle that follows
STOP = "stop"  # abort every request in flight (the front end has already failed their streams)
EXIT = "exit"  # end the loop


@dataclass
class EngineInfo:
    """What the front end needs of the engine: names for the API and /metrics, limits and the tokenizer."""

    model_name: str
    max_model_len: int
    vocab_size: int
    tokenizer: Tokenizer
    labels: dict[str, str]  # model, device, dtype, quant: /metrics' perfxllm_info

    @classmethod
    def of(cls, engine: Engine) -> EngineInfo:
        name = Path(engine.model_path).name
        return cls(
            name,
            engine.max_model_len,
            engine.model_config.vocab_size,
            engine.tokenizer,
            {
                "model": name,
                "device": device_tag(engine.device),
                "dtype": str(engine.dtype).removeprefix("torch."),
                "quant": quant_label(engine.model, engine.dtype),
            },
        )


@dataclass
class LoadFailed:
    message: str


@dataclass
class Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Abort:
    request_ids: list[str]


@dataclass
class StepResult:
    outputs: list[RequestOutput]
    failed: list[tuple[str, Exception]]  # requests that ended with an error: RequestError or RuntimeError
    stats: EngineStats


def frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return FRAME_HEADER.pack(len(payload)) + payload


def send_message(sock: socket.socket, message: Any) -> None:
    sock.sendall(frame(message))


def recv_message(sock: socket.socket) -> Any:
    """The next message; EOFError when the other end has closed."""
    (size,) = FRAME_HEADER.unpack(_recv_exactly(sock, FRAME_HEADER.size))
    return pickle.loads(_recv_exactly(sock, size))


async def read_message(reader: asyncio.StreamReader) -> Any:
    """recv_message for asyncio; asyncio.IncompleteReadError when the other end has closed."""
    (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
    return pickle.loads(await reader.readexactly(size))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n
    return bytes(buf)


class EngineLoop:
    """Runs an Engine for the front end at the other end of `sock` until EXIT or until that end closes."""

    def __init__(self, engine: Engine, sock: socket.socket) -> None:
        self.engine, self.sock = engine, sock
        self._failed: list[tuple[str, Exception]] = []

    def run(self) -> None:
        try:
            while self._turn():
                pass
        except (EOFError, OSError):  # the front end is gone
            pass
        finally:
            self.sock.close()  # the front end reads the end of the connection: it fails what is left

    def _turn(self) -> bool:
        """Apply the commands that came in (waiting for one when there is nothing to run), run a step, and
        send what it made. False at EXIT."""
        for command in self._commands():
            if command == EXIT:
                return False
            self._apply(command)
        outputs = self._step() if self.engine.has_unfinished() else []
        send_message(self.sock, StepResult(outputs, self._failed, self._stats()))
        self._failed = []
        return True

    def _commands(self) -> list[Any]:
        """The messages that have arrived, unpacked; blocks for one when nothing runs."""
        commands: list[Any] = []
        wait = not self.engine.has_unfinished()
        while wait or select.select([self.sock], [], [], 0)[0]:
            commands += recv_message(self.sock)
            wait = False
        return commands

    def _apply(self, command: Add | Abort | str) -> None:
        if command == STOP:
            self._abort(list(self.engine.seqs))
        elif isinstance(command, Abort):
            self._abort(command.request_ids)
        elif isinstance(command, Add):
            try:
                self.engine.add_request(command.prompt_ids, command.params, command.request_id)
            except Exception as e:  # RequestError, or a bug: either way only this request fails
                self._failed.append((command.request_id, _portable(e)))

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:  # the engine's requests in flight; any other id is one that has ended
            self.engine.abort(rid)

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as e:
            in_flight = list(self.engine.seqs)
            log.exception("engine step failed; failing the %d requests in flight", len(in_flight))
            error = RuntimeError(f"the engine failed: {type(e).__name__}: {e}")
            self._failed += [(rid, error) for rid in in_flight]
            self._abort(in_flight)
            return []

    def _stats(self) -> EngineStats:
        e = self.engine
        return EngineStats(
            num_waiting=len(e.scheduler.waiting),
            num_running=len(e.scheduler.running),
            kv_cache_usage=e.block_manager.usage,
            prefix_cache_queries=e.block_manager.prefix_queries,
            prefix_cache_hits=e.block_manager.prefix_hits,
            num_preemptions=e.scheduler.num_preemptions,
        )


def _portable(e: Exception) -> Exception:
    """An exception that pickles and that the front end maps to the right HTTP status."""
    return e if type(e) is RequestError else RuntimeError(f"{type(e).__name__}: {e}")


def run_engine_process(config: EngineConfig, sock: socket.socket) -> None:
    """The engine process: build the Engine, say so (or why not), then serve the front end."""
    # Ctrl-C (and a service manager's SIGTERM) reaches the whole process group: the front end ends this
    # process once its requests are failed, and a front end that dies closes the socket, which ends it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = Engine(config)
    except PerfxError as e:
        send_message(sock, LoadFailed(str(e)))
        return
    except Exception as e:
        log.exception("the engine could not be built")
        send_message(sock, LoadFailed(f"the engine could not be built: {type(e).__name__}: {e}"))
        return
    try:
        send_message(sock, EngineInfo.of(engine))
    except OSError:  # the front end was stopped while the model loaded
        engine.close()
        return
    try:
        EngineLoop(engine, sock).run()
    finally:
        engine.close()
