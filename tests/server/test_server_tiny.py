"""Server behaviour that needs a hand on the Engine or the process (a failing step, the engine process,
Ctrl-C mid-stream), and request forms, on a tiny random model: fast, and independent of the default model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tiny_models import save_tiny_model

from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine
from perfxllm.server.app import ServerConfig
from perfxllm.server.serve import SHUTDOWN_GRACE_S


@pytest.fixture(scope="module")
def server(tiny_model_dir, thread_server):
    engine = Engine(EngineConfig(model=str(tiny_model_dir)))
    with thread_server(engine, ServerConfig(), max_queue=8) as s:
        yield s


def completion(server, **body) -> dict:
    r = server.post("/v1/completions", json={"temperature": 0, "max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    return r.json()


def data_lines(response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def test_engine_failure_fails_only_the_requests_in_flight(server):
    runner = server.engine.runner
    real_run = runner.run

    def fail_once(*args):
        runner.run = real_run
        raise RuntimeError("injected fault")

    body = {"prompt": "The quick", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with server.stream("/v1/completions", body) as r:
        events = r.iter_lines()
        assert next(e for e in events if e.startswith("data: "))
        runner.run = fail_once
        rest = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
    error = json.loads(rest[-2])["error"]
    assert rest[-1] == "[DONE]"
    assert error["type"] == "server_error" and "injected fault" in error["message"]

    runner.run = fail_once
    r = server.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 4})
    assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]

    assert server.healthy()
    assert completion(server, prompt="The quick")["choices"][0]["finish_reason"] == "length"
    server.wait_idle()
    assert server.metric("perfxllm_requests_total", 'finish_reason="error"') == 2


def engine_process(server) -> int:
    """The pid of `perfxllm serve`'s engine process: the child multiprocessing spawned to run a function
    (the other is multiprocessing's resource tracker)."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    if not children.exists():
        pytest.skip("needs Linux /proc")
    pids = map(int, children.read_text().split())
    (pid,) = [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return pid


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of all its threads, in 1/100 s


@pytest.fixture(scope="module")
def tiny_process_server(spawn_server, tiny_model_dir):
    return spawn_server(str(tiny_model_dir)).wait_ready()


def test_the_engine_runs_in_its_own_process_and_blocks_when_idle(tiny_process_server):
    server = tiny_process_server
    pid = engine_process(server)
    assert completion(server, prompt="The quick")["usage"]["completion_tokens"] == 4
    assert cpu_ticks(pid) > 100  # it loaded the model and ran the request
    server.wait_idle()
    before = cpu_ticks(pid)
    time.sleep(1.0)
    assert cpu_ticks(pid) - before <= 2  # a spinning loop would use ~100


def test_a_dead_engine_process_fails_the_streams_and_health(spawn_server, tmp_path):
    model = save_tiny_model(tmp_path / "long-context", max_position_embeddings=8192)
    server = spawn_server(str(model)).wait_ready()
    body = {"prompt": "The quick", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with server.stream("/v1/completions", body) as r:
        events = r.iter_lines()
        assert next(e for e in events if e.startswith("data: "))
        os.kill(engine_process(server), signal.SIGKILL)
        rest = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert "engine has stopped" in json.loads(rest[-2])["error"]["message"]
    assert server.proc.poll() is None  # the front end stays up, and says what is wrong
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
    r = server.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 4})
    assert r.status_code == 503 and "engine has stopped" in r.json()["error"]["message"]


def test_a_model_that_fails_to_load_is_a_clear_error(tmp_path):
    broken = save_tiny_model(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    done = subprocess.run(
        [sys.executable, "-m", "perfxllm", "serve", str(broken), "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("perfxllm: error:") and "Traceback" not in done.stderr


def test_several_prompts_and_token_ids(server):
    tok = server.engine.tokenizer
    one = completion(server, prompt="The quick")["choices"][0]["text"]
    r = completion(server, prompt=["The quick", "Paris is"], n=2)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["choices"][0]["text"] == r["choices"][1]["text"] == one
    assert r["usage"]["prompt_tokens"] == len(tok.encode("The quick")) + len(tok.encode("Paris is"))
    assert r["usage"]["completion_tokens"] == 16

    ids = completion(server, prompt=tok.encode("The quick"))
    assert ids["choices"][0]["text"] == one
    assert len(completion(server, prompt=[tok.encode("The quick"), [5, 6, 7]])["choices"]) == 2


def test_a_request_larger_than_the_queue_is_a_400_not_a_429(server):
    r = server.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2})
    assert r.status_code == 400 and "at most 8" in r.json()["error"]["message"]


def test_a_chat_template_that_loops_is_a_400(thread_server, tmp_path, monkeypatch):
    """A model whose chat template loops inside loops: each chat request stops at the render's time bound with a
    400 naming it, and the server goes on serving."""
    from perfxllm.model import tokenizer

    monkeypatch.setattr(tokenizer, "RENDER_SECONDS", 0.3)
    model = save_tiny_model(tmp_path / "looping-template")
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": loops}))
    with thread_server(Engine(EngineConfig(model=str(model))), ServerConfig()) as s:
        for _ in range(2):
            r = s.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 400 and "ran for over 0.3 s" in r.json()["error"]["message"], r.text
        assert completion(s, prompt="The quick")["choices"]
        assert s.healthy()


def test_ctrl_c_ends_streams_in_flight_and_exits(spawn_server, tmp_path):
    model = save_tiny_model(tmp_path / "long-context", max_position_embeddings=8192)
    server = spawn_server(str(model)).wait_ready()
    body = {"prompt": "The quick", "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with server.stream("/v1/completions", body) as r:
        events = r.iter_lines()
        assert next(e for e in events if e.startswith("data: "))
        started = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        rest = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert "shutting down" in json.loads(rest[-2])["error"]["message"]
    assert server.proc.wait(30) in (0, 130)  # 130: uvicorn re-raises the SIGINT it caught
    assert time.monotonic() - started < 15
    log = server.log.read_text()
    assert "Traceback" not in log and "Finished server process" in log


def test_a_client_that_stops_sending_its_body_harms_nothing(spawn_server, tiny_model_dir):
    """A client gone before its body was all sent gets no traceback and no 500; one that stays silent holds
    up the shutdown for SHUTDOWN_GRACE_S at most."""
    server = spawn_server(str(tiny_model_dir)).wait_ready()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as gone:
        gone.sendall(head + b'{"prompt":')
        time.sleep(0.5)
    server.wait_for(lambda: server.metric("perfxllm_http_errors_total", 'status="499"') == 1, "the 499")
    assert server.metric("perfxllm_http_errors_total", 'status="500"') == 0
    assert completion(server, prompt="hi", max_tokens=2)["choices"]
    with socket.create_connection(("127.0.0.1", port)) as silent:
        silent.sendall(head + b'{"prompt":')
        time.sleep(0.5)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
        assert time.monotonic() - started < SHUTDOWN_GRACE_S + 10
    assert "Traceback" not in server.log.read_text()


@pytest.mark.parametrize(
    "bad", [{"temperature": 1e-300}, {"repetition_penalty": 1e-300}, {"temperature": 0.5, "seed": 2**64}]
)
def test_an_extreme_sampling_value_harms_no_other_request(server, bad):
    body = {"prompt": "The quick", "max_tokens": 300, "ignore_eos": True, "stream": True}
    with server.stream("/v1/completions", body) as r:
        events = r.iter_lines()
        assert next(e for e in events if e.startswith("data: "))
        odd = server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, **bad})
        rest = [e for e in events if e.startswith("data: ")]
    assert odd.status_code in (200, 400), odd.text
    assert rest[-1] == "data: [DONE]" and not any('"error"' in e for e in rest)
