"""Benchmarks: `perfxllm bench kernels | e2e | serve`. Results are JSON records with the device, the commit
and the command, written under benchmarks/results/."""

from __future__ import annotations

import os
import subprocess


def current_commit() -> str | None:
    """HEAD of the checkout, or $PERFXLLM_COMMIT where the tree is a copy without git (the GPU machine)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PERFXLLM_COMMIT")
