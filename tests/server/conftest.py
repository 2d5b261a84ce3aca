"""Real servers for the server tests: `perfxllm serve` in a subprocess, as users run it, or uvicorn on a
thread of this process when a test needs to reach the Engine (to make it fail, to watch its thread)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from tiny_models import save_tiny_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    url: str
    api_key: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, timeout: float = 120, **kwargs) -> httpx.Response:
        return httpx.post(
            f"{self.url}{path}", headers=kwargs.pop("headers", self.headers), timeout=timeout, **kwargs
        )

    def stream(self, path: str, body: dict) -> contextlib.AbstractContextManager[httpx.Response]:
        return httpx.stream("POST", f"{self.url}{path}", json=body, headers=self.headers, timeout=120)

    def metric(self, name: str, labels: str | None = None) -> float:
        """A sample from /metrics: name{labels}, or the sum over a family's labels (0 if it has none yet)."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=30).raise_for_status().text
        assert name.removesuffix("_total") in text, f"{name} is not in /metrics"
        samples = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
        wanted = {f"{name}{{{labels}}}"} if labels else None
        return sum(
            float(value) for key, value in samples if (key in wanted if wanted else key.split("{")[0] == name)
        )

    def is_idle(self) -> bool:
        return (
            self.metric("perfxllm_num_requests_running") == 0
            and self.metric("perfxllm_num_requests_waiting") == 0
            and self.metric("perfxllm_kv_cache_usage_ratio") == 0
        )

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no request runs or waits and every KV block is free."""
        wait_until(self.is_idle, timeout, "the server to be idle")

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
        wait_until(condition, timeout, what)

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=10).json() == {"status": "ok"}


class ServerProcess(Server):
    def __init__(self, args: list[str], log: Path, api_key: str | None) -> None:
        self.url, self.log, self.api_key = f"http://127.0.0.1:{free_port()}", log, api_key
        cmd = [sys.executable, "-m", "perfxllm", "serve", *args, "--port", self.url.rsplit(":", 1)[1]]
        cmd += ["--api-key", api_key] if api_key else []
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited early:\n{self.log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if self.healthy():
                    return self
            time.sleep(0.2)
        raise TimeoutError(f"the server was not ready in {timeout} s:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


class ThreadServer(Server):
    """uvicorn on a thread of this process, around an Engine the test holds (on the engine's own thread)."""

    def __init__(self, engine, config, max_queue: int = 512) -> None:
        import uvicorn

        from perfxllm.server.app import create_app
        from perfxllm.server.async_engine import AsyncEngine

        self.engine, self.api_key = engine, config.api_key
        self.app = create_app(AsyncEngine.on_thread(engine, max_queue), config)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=free_port(), log_level="warning")
        )
        self.url = f"http://127.0.0.1:{self.server.config.port}"

    def __enter__(self) -> ThreadServer:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 60, "uvicorn to start")
        assert self.server.started
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def spawn_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """spawn_server(*serve_args, api_key=None) -> a started ServerProcess (not yet ready); all are stopped at
    the end of the session."""
    servers: list[ServerProcess] = []

    def spawn(*args: str, api_key: str | None = None) -> ServerProcess:
        servers.append(ServerProcess(list(args), tmp_path_factory.mktemp("server") / "log.txt", api_key))
        return servers[-1]

    yield spawn
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def thread_server() -> type[ThreadServer]:
    return ThreadServer
