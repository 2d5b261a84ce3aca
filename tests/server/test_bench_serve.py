"""`perfxllm bench serve` on a tiny model: offline and against a server it starts; exact output lengths."""

from __future__ import annotations

import asyncio
import json
import math
import socket

from perfxllm.bench.serve import BenchRequest, run_online, synthesize
from perfxllm.cli import main
from perfxllm.model.loader import open_checkpoint

REQUIRED = {
    "model", "quant", "num_requests", "concurrency", "output_tok_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50",
    "device", "commit", "command", "versions",
}  # fmt: skip


def test_bench_serve_offline_and_online(tiny_model_dir, tmp_path):
    common = [
        str(tiny_model_dir),
        "--num-requests",
        "6",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--seed",
        "1",
    ]
    expected_tokens = sum(
        r.output_len
        for r in synthesize(open_checkpoint(str(tiny_model_dir)).tokenizer, 6, 16, 8, 512, seed=1)
    )

    assert main(["bench", "serve", *common, "--offline", "--result-dir", str(tmp_path)]) == 0
    offline = json.loads((tmp_path / "serve-offline-cpu.json").read_text())
    assert offline.keys() >= REQUIRED
    assert (offline["completed"], offline["total_output_tokens"]) == (6, expected_tokens)

    assert main(["bench", "serve", *common, "--concurrency", "1", "3", "--result-dir", str(tmp_path)]) == 0
    online = json.loads((tmp_path / "serve-cpu.json").read_text())
    assert online.keys() >= REQUIRED and online["model"] == "tiny-llama" and online["mode"] == "server"
    assert [(r["concurrency"], r["completed"], r["failed"]) for r in online["runs"]] == [(1, 6, 0), (3, 6, 0)]
    assert all(r["total_output_tokens"] == expected_tokens for r in online["runs"])
    assert online["output_tok_s"] > 0 and online["ttft_ms_p50"] > 0
    assert all(r["client_cpu_frac"] > 0 for r in online["runs"]) and "client_cpu_frac" not in offline
    assert (tmp_path / "serve-cpu.png").stat().st_size > 0


def test_bench_client_counts_a_broken_request_as_failed():
    """A request the server never answers fails alone: the run goes on and reports it."""
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    requests = [BenchRequest("Hello", 1, 4)] * 3
    summary = asyncio.run(run_online(f"http://127.0.0.1:{port}", "m", requests, 2, math.inf, 0))
    assert (summary["completed"], summary["failed"]) == (0, 3)
