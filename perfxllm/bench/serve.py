"""`perfxllm bench serve`: serving throughput and latency, measured and reported as `vllm bench serve` does.

The requests replay a ShareGPT-like length distribution: prompt and output lengths drawn from seeded
lognormals around --input-len and --output-len, prompts cut from English text (Python's own help pages),
and ignore_eos, so that each request generates exactly its output length. Against a server (the one at
--base-url, or one started here on a free port) an async client keeps --concurrency requests in flight, or
sends them as Poisson arrivals at --request-rate; --offline adds them all at once to an in-process Engine.

Results go to <result-dir>/serve-<device>.json (serve-offline-<device>.json) with a plot beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perfxllm import __version__
from perfxllm.bench import current_commit
from perfxllm.errors import PerfxError

LENGTH_SIGMA = 0.7  # of log length: ShareGPT's lengths spread over about an order of magnitude


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class Result:
    prompt_len: int
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


def run_bench_serve(args: argparse.Namespace) -> int:
    from perfxllm.model.loader import open_checkpoint

    if args.num_requests < 1 or min(args.concurrency) < 1 or args.input_len < 1 or args.output_len < 1:
        raise PerfxError("--num-requests, --concurrency, --input-len and --output-len must be positive")
    ckpt = open_checkpoint(args.model, args.random_weights)
    max_len = ckpt.config.context_length(args.max_model_len)
    requests = synthesize(
        ckpt.tokenizer, args.num_requests, args.input_len, args.output_len, max_len, args.seed
    )
    load_before = os.getloadavg()[0]
    if args.offline:
        info, runs = run_offline(args, requests)
    else:
        with server(args) as base_url:
            info = server_info(base_url)
            runs = [
                asyncio.run(run_online(base_url, info["model"], requests, c, args.request_rate, args.seed))
                for c in args.concurrency
            ]
    record = {
        **info,
        "mode": "offline" if args.offline else "server",
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
        "seed": args.seed,
        **runs[-1],  # the last run, flat, for a quick look; every run is under "runs"
        "runs": runs,
        "commit": current_commit(),
        "command": shlex.join(["perfxllm", *sys.argv[1:]]),
        "versions": {
            "python": platform.python_version(),
            "perfxllm": __version__,
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_before_after": [load_before, os.getloadavg()[0]],  # other work on the machine skews timings
    }
    stem = f"serve-{'offline-' if args.offline else ''}{info['device']}"
    out = Path(args.result_dir) / f"{stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


# -- the workload ---------------------------------------------------------------------------------------------
def synthesize(
    tokenizer: Any, num: int, input_len: int, output_len: int, max_len: int, seed: int
) -> list[BenchRequest]:
    import pydoc_data.topics

    rng = random.Random(seed)
    words = " ".join(pydoc_data.topics.topics.values()).split()
    requests = []
    for _ in range(num):
        out_len = _lognormal(rng, output_len, 1, min(4 * output_len, max_len // 2))
        prompt_len = _lognormal(rng, input_len, 4, min(4 * input_len, max_len - out_len - 1))
        start = rng.randrange(len(words) - 2 * prompt_len)
        ids = tokenizer.encode(" ".join(words[start : start + 2 * prompt_len]), add_bos=False)[:prompt_len]
        requests.append(BenchRequest(tokenizer.decode(ids), prompt_len, out_len))
    return requests


def _lognormal(rng: random.Random, median: int, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), LENGTH_SIGMA))))


# -- against a server --------------------------------------------------------------------------------------
@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    """The server at --base-url, or a `perfxllm serve` started on a free port for the benchmark."""
    if args.base_url:
        yield args.base_url.rstrip("/")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "perfxllm", "serve", "--port", str(port), "--log-level", "warning"]
    cmd += [args.model] if args.model else []
    cmd += ["--random-weights", args.random_weights] if args.random_weights else []
    cmd += ["--device", args.device, "--dtype", args.dtype]
    cmd += ["--quantization", args.quantization] if args.quantization else []
    cmd += ["--max-model-len", str(args.max_model_len)] if args.max_model_len else []
    cmd += [
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
    ]
    cmd += ["--max-queue", str(max(args.num_requests, 512))]
    proc = subprocess.Popen(cmd)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(60)


def _wait_healthy(base_url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PerfxError(f"the server exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{base_url}/health", timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.5)
    raise PerfxError(f"the server at {base_url} was not ready after {timeout:.0f} s")


def server_info(base_url: str) -> dict[str, str]:
    """Model, device, dtype and quant, from the server's perfxllm_info metric."""
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=30) as r:
            text = r.read().decode()
    except OSError as e:
        raise PerfxError(f"could not read {base_url}/metrics: {e}") from None
    for line in text.splitlines():
        if line.startswith("perfxllm_info{"):
            labels = line[line.index("{") + 1 : line.rindex("}")]
            return {k: v.strip('"') for k, v in (item.split("=", 1) for item in labels.split('",'))}
    raise PerfxError(f"{base_url}/metrics has no perfxllm_info: is it a perfxllm server?")


async def run_online(
    base_url: str, model: str, requests: list[BenchRequest], concurrency: int, rate: float, seed: int
) -> dict[str, Any]:
    """aiohttp, as vllm bench serve uses: httpx's connection pool scans every connection at each request's
    start and end, and with 1024 requests at 256 streams that scan took the load generator's whole core
    (the server then saw requests in waves; benchmarks/results/ab-bench-serve-client-cpu.json)."""
    import aiohttp

    url = f"{base_url}/v1/completions"
    connector = aiohttp.TCPConnector(limit=0)  # a connection for every request in flight
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        await send_one(session, url, model, BenchRequest("Warm up", 2, 4))
        limit = asyncio.Semaphore(concurrency)
        rng = random.Random(seed)

        async def limited(r: BenchRequest) -> Result:
            async with limit:
                return await send_one(session, url, model, r)

        start, cpu_start = time.perf_counter(), time.process_time()
        tasks = []
        for r in requests:
            tasks.append(asyncio.create_task(limited(r)))
            if not math.isinf(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        client_cpu = (time.process_time() - cpu_start) / duration
    return summarize(results, duration, concurrency, client_cpu)


async def send_one(session: Any, url: str, model: str, r: BenchRequest) -> Result:
    """One streamed completion; a refused or broken request is a failed one, not the end of the run."""
    import aiohttp

    body = {
        "model": model,
        "prompt": r.prompt,
        "max_tokens": r.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = Result(r.prompt_len)
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for line in response.content:  # one SSE line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk, now = json.loads(line[6:]), time.perf_counter()
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                elif chunk["choices"]:
                    if result.ttft:
                        result.itl.append(now - last)
                    else:
                        result.ttft = now - start
                    last = now
                elif chunk.get("usage"):
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
                    result.output_len = chunk["usage"]["completion_tokens"]
    except (aiohttp.ClientError, ValueError) as e:  # ValueError: a line that is no JSON, or too long
        result.error = f"{type(e).__name__}: {e}"
    result.latency = last - start
    return result


# -- in-process ----------------------------------------------------------------------------------------------
def run_offline(args: argparse.Namespace, requests: list[BenchRequest]) -> tuple[dict[str, str], list[dict]]:
    from perfxllm.cli import engine_options
    from perfxllm.engine.config import EngineConfig
    from perfxllm.engine.engine import Engine, device_tag
    from perfxllm.info import quant_label
    from perfxllm.sampling_params import SamplingParams

    engine = Engine(EngineConfig(model=args.model, **engine_options(args)))
    info = {
        "model": Path(engine.model_path).name,
        "device": device_tag(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "quant": quant_label(engine.model, engine.dtype),
    }
    engine.add_request(engine.tokenizer.encode("Warm up"), SamplingParams(max_tokens=4, temperature=0))
    while engine.has_unfinished():
        engine.step()
    results: dict[str, Result] = {}
    start = time.perf_counter()
    last: dict[str, float] = {}
    for r in requests:
        ids = engine.tokenizer.encode(r.prompt)
        rid = engine.add_request(ids, SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True))
        results[rid], last[rid] = Result(len(ids)), start
    while engine.has_unfinished():
        outputs, now = engine.step(), time.perf_counter()
        for out in outputs:
            res = results[out.request_id]
            if res.ttft:
                res.itl.append(now - last[out.request_id])
            else:
                res.ttft = now - start
            last[out.request_id], res.output_len, res.latency = now, out.num_output_tokens, now - start
    return info, [summarize(list(results.values()), time.perf_counter() - start, len(requests))]


# -- results ------------------------------------------------------------------------------------------------
def summarize(
    results: list[Result], duration: float, concurrency: int, client_cpu: float | None = None
) -> dict[str, Any]:
    """client_cpu: the load generator's CPU time over the run's duration (1.0: a whole core, where its numbers
    are its own rather than the server's)."""
    ok = [r for r in results if r.error is None]
    for r in results:
        if r.error is not None:
            print(f"request failed: {r.error}", file=sys.stderr)
    input_tokens, output_tokens = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    summary: dict[str, Any] = {
        "concurrency": concurrency,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_tok_s": output_tokens / duration,
        "total_tok_s": (input_tokens + output_tokens) / duration,
    }
    if client_cpu is not None:
        summary["client_cpu_frac"] = client_cpu
    series = {
        "ttft_ms": [r.ttft * 1000 for r in ok],
        "tpot_ms": [(r.latency - r.ttft) / (r.output_len - 1) * 1000 for r in ok if r.output_len > 1],
        "itl_ms": [t * 1000 for r in ok for t in r.itl],
        "e2el_ms": [r.latency * 1000 for r in ok],
    }
    for name, values in series.items():
        v = np.array(values or [math.nan])
        summary |= {
            f"{name}_mean": float(v.mean()),
            f"{name}_p50": float(np.median(v)),
            f"{name}_p99": float(np.percentile(v, 99)),
        }
    print_summary(summary)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    rows = [
        ("Successful requests:", s["completed"]),
        ("Maximum request concurrency:", s["concurrency"]),
        ("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
        ("Total input tokens:", s["total_input_tokens"]),
        ("Total generated tokens:", s["total_output_tokens"]),
        ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{s['output_tok_s']:.2f}"),
        ("Total Token throughput (tok/s):", f"{s['total_tok_s']:.2f}"),
    ]
    if "client_cpu_frac" in s:
        rows.append(("Load generator CPU (of a core):", f"{s['client_cpu_frac']:.0%}"))
    print(f"{' Serving Benchmark Result ':=^50}")
    for label, value in rows:
        print(f"{label:<40}{value:<10}")
    for name, title in (
        ("ttft", "Time to First Token"),
        ("tpot", "Time per Output Token (excl. 1st token)"),
        ("itl", "Inter-token Latency"),
        ("e2el", "End-to-end Latency"),
    ):
        print(f"{title:-^50}")
        for stat, key in (("Mean", "mean"), ("Median", "p50"), ("P99", "p99")):
            print(f"{f'{stat} {name.upper()} (ms):':<40}{s[f'{name}_ms_{key}']:<10.2f}")
    print("=" * 50)
    if s.get("client_cpu_frac", 0) > 0.9:
        print(
            f"warning: the load generator used {s['client_cpu_frac']:.0%} of a core: these numbers may be its own",
            file=sys.stderr,
        )


def plot(record: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    runs = record["runs"]
    labels = [str(r["concurrency"]) for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(labels, [r["output_tok_s"] for r in runs], color="tab:blue")
    left.set(xlabel="concurrency", ylabel="output tokens/s", title="Throughput")
    x = np.arange(len(runs))
    for k, (key, name) in enumerate(
        (("ttft_ms_p50", "TTFT p50"), ("ttft_ms_p99", "TTFT p99"), ("tpot_ms_p50", "TPOT p50"))
    ):
        right.bar(x + (k - 1) * 0.27, [r[key] for r in runs], 0.27, label=name)
    right.set_xticks(x, labels)
    right.set(xlabel="concurrency", ylabel="ms", title="Latency")
    right.legend()
    fig.suptitle(
        f"perfxllm {record['mode']}: {record['model']} ({record['quant']}) on {record['device']}, "
        f"{record['num_requests']} requests"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
