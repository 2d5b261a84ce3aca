"""Where `perfxllm bench serve --offline` spends its time on the GPU, step by step.

    PYTHONPATH=. python scripts/profile_serve_steps.py [--random-weights llama3-8b] [--quantization int4]
        [--num-requests 1000] [--max-num-seqs 256] [--max-num-batched-tokens 8192] [--out steps.json]

Runs the offline benchmark's workload (the same synthesized requests, all added at once, EOS ignored) on the
real Engine and times every step, split into decode-only steps and steps with prompt tokens, by what each
step launched (with async scheduling a step's outputs are the previous step's), with the time each step
blocks on the previous step's draws (near 0 where the host, not the GPU, sets the pace). Then it profiles a
few steps of each kind with torch.profiler (their kernels' GPU time) and one of each with cProfile (where
the host's time goes).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shlex
import statistics
import sys
import time

import torch

from perfxllm.bench import current_commit
from perfxllm.bench.e2e_gpu import kernel_times
from perfxllm.bench.serve import synthesize
from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine
from perfxllm.engine.sampler import SampledBatch
from perfxllm.sampling_params import SamplingParams


def host_profile(engine: Engine) -> tuple[list[str], list]:
    """One engine step under cProfile: its 25 functions of most own time, and the step's outputs."""
    prof = cProfile.Profile()
    outputs = prof.runcall(engine.step)
    stats = pstats.Stats(prof).sort_stats("tottime")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:25]
    top = [
        f"{tt * 1e3:8.2f} own {ct * 1e3:8.2f} cum {nc:6d}x {fn}:{ln}({name})"
        for (fn, ln, name), (_, nc, tt, ct, _) in rows
    ]
    return top, outputs


def gpu_timeline(engine: Engine, steps: int) -> dict:
    """`steps` engine steps in a row under torch.profiler, nothing waiting between them: the GPU's span from
    the first kernel's start to the last one's end, how long some kernel or copy ran (intervals merged),
    and the longest idle gaps."""
    cuda = torch.autograd.DeviceType.CUDA
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == cuda)
    busy, gaps, end = 0.0, [], spans[0][0]
    for start, stop in spans:
        if start > end:
            gaps.append(start - end)
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    span = end - spans[0][0]
    return {
        "steps": steps,
        "span_ms": span / 1e3,
        "busy_ms": busy / 1e3,
        "idle_ms": (span - busy) / 1e3,
        "longest_gaps_us": [round(g, 1) for g in sorted(gaps)[-8:]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--random-weights", default="llama3-8b")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--profile-after", type=int, default=300, help="steps before the profiled ones")
    ap.add_argument("--device", default="cuda", help="cpu runs the loop without the profiled steps")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    engine = Engine(
        EngineConfig(
            random_weights=args.random_weights,
            quantization=args.quantization,
            device=args.device,
            dtype="float16" if args.device == "cuda" else "auto",
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
    )
    engine.add_request(engine.tokenizer.encode("Warm up"), SamplingParams(max_tokens=4, temperature=0))
    while engine.has_unfinished():  # as the offline benchmark does: first-use costs stay out of the steps
        engine.step()
    requests = synthesize(engine.tokenizer, args.num_requests, 200, 150, engine.max_model_len, 0)
    for r in requests:
        params = SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True)
        engine.add_request(engine.tokenizer.encode(r.prompt), params)

    # the kind of step each engine.step() launches: decode-only when every scheduled sequence runs one token
    launched: list[str] = []
    tokens: list[int] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        launched.append(
            "none" if batch is None else "decode" if batch.num_tokens == len(batch.seqs) else "mixed"
        )
        tokens.append(batch.num_tokens if batch else 0)
        return batch

    engine.scheduler.schedule = recording_schedule
    # the time a step blocks on the previous step's draws: near 0 when the host is the bottleneck
    waits: list[float] = []
    samples = SampledBatch.samples

    def timed_samples(drawn: SampledBatch):
        t0 = time.perf_counter()
        if drawn._ready is not None:
            drawn._ready.synchronize()
        waits.append(time.perf_counter() - t0)
        return samples(drawn)

    SampledBatch.samples = timed_samples
    steps, profiled, host = [], {"decode": [], "mixed": []}, {}
    # at most this many steps of each profile (a run may have no more steps of one kind: with 1024 sequences,
    # none with prompt tokens once the prompts are in)
    kernel_steps, host_steps = 24, 4
    timeline = None
    start = time.perf_counter()
    while engine.has_unfinished():
        running = len(engine.scheduler.running)
        t0 = time.perf_counter()
        if args.device == "cuda" and len(steps) >= args.profile_after and host_steps:
            if timeline is None:  # first whether the GPU waits between kernels or steps
                timeline = gpu_timeline(engine, 5)
            elif min(len(p) for p in profiled.values()) < 3 and kernel_steps:  # then the GPU's view
                kernel_steps -= 1
                total, top = kernel_times(engine.step)
                if len(profiled[launched[-1]]) < 3:
                    wall = (time.perf_counter() - t0) * 1e3
                    profiled[launched[-1]].append(
                        {"wall_ms": wall, "kernel_ms": total, "running": running, "top": top}
                    )
            else:  # then the host's: Python functions by own time
                host_steps -= 1
                top, _ = host_profile(engine)
                host.setdefault(launched[-1], top)
            continue
        waits.clear()
        out = engine.step()
        steps.append(
            {
                "ms": (time.perf_counter() - t0) * 1e3,
                "wait_ms": sum(waits) * 1e3,
                "running": running,
                "tokens": tokens[-1],
                "outputs": len(out),
                "kind": launched[-1],
            }
        )
    duration = time.perf_counter() - start

    decode = [s["ms"] for s in steps if s["kind"] == "decode"]
    mixed = [s["ms"] for s in steps if s["kind"] == "mixed"]
    summary = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "commit": current_commit(),
        "command": shlex.join(["python", *sys.argv]),
        "args": vars(args),
        "duration_s": duration,
        "steps": len(steps),
        "decode_only_steps": len(decode),
        "decode_only_ms_median": statistics.median(decode) if decode else None,
        "decode_only_s_total": sum(decode) / 1e3,
        "other_steps": len(mixed),
        "other_ms_median": statistics.median(mixed) if mixed else None,
        "other_s_total": sum(mixed) / 1e3,
        "wait_s_total": sum(s["wait_ms"] for s in steps) / 1e3,
        "timeline": timeline,
        "profiled": profiled,
        "host_top_ms": host,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**summary, "per_step": steps}, f)


if __name__ == "__main__":
    main()
