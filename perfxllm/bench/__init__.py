"""Benchmarks: `perfxllm bench kernels | e2e | serve`. Results are JSON records with the device, the commit
and the command, written under benchmarks/results/."""

from __future__ import annotations

import os
import statistics
import subprocess

import torch


def current_commit() -> str | None:
    """$PERFXLLM_COMMIT where it is set (the GPU machine runs a copy of the tree whose git state, if any, is
    not this commit's), else HEAD of the checkout."""
    if os.environ.get("PERFXLLM_COMMIT"):
        return os.environ["PERFXLLM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def copy_gbps(device: torch.device) -> float:
    """Device-to-device copy bandwidth, read + write, median of 20 copies of 1 GiB, each timed with events
    (not in a CUDA graph: captured, the same copy measured about a third less on an H200)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() / statistics.median(times) / 1e9
