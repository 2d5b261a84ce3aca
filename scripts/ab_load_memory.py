"""A/B of what loading a model costs before its weights arrive, on this CPU: this tree against another commit's
perfxllm (a `git archive` of it), alternating, each measurement in a fresh process. Per tree: the model's
skeleton as build_model makes it (llama2-7b and llama3-8b shapes, fp16: the time and the peak RSS before any
weight is loaded), and the default model's whole build_model (time and peak RSS).

    PYTHONPATH=. python scripts/ab_load_memory.py BASE_REV OUT.json [ROUNDS]
"""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from perfxllm.bench import current_commit

MEASURE = """
import resource, sys, time, torch
from perfxllm.model.config import ModelConfig
from perfxllm.model.loader import build_model, default_model_path, open_checkpoint
from perfxllm.model.random_weights import PRESETS
from perfxllm.model.registry import model_class
what = sys.argv[1]
start = time.perf_counter()
if what == "default":
    build_model(open_checkpoint(default_model_path()), torch.device("cpu"), torch.float32)
else:
    cfg = ModelConfig.from_hf(PRESETS[what])
    with torch.device("cpu"):
        model = model_class(cfg.architecture)(cfg, 4096)
    model.to(dtype=torch.float16)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""
CASES = ["llama2-7b", "llama3-8b", "default"]


def measure(tree: str, case: str) -> tuple[float, int]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, case],  # python -c puts its working directory first on sys.path
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, rss = out.stdout.split()
    return float(seconds), int(rss)


def main(base_rev: str, out: str, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as base:
        archive = subprocess.run(["git", "archive", base_rev, "perfxllm"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
        trees = {"base": base, "new": str(Path.cwd())}
        runs: dict[str, dict[str, list[tuple[float, int]]]] = {t: {c: [] for c in CASES} for t in trees}
        for _ in range(rounds):
            for case in CASES:
                for name, tree in trees.items():
                    runs[name][case].append(measure(tree, case))
    rows = [
        {
            "tree": name,
            "case": case,
            "seconds_median": round(statistics.median(s for s, _ in got), 3),
            "peak_rss_gb_median": round(statistics.median(r for _, r in got) / 1e9, 3),
            "runs": len(got),
        }
        for name, cases in runs.items()
        for case, got in cases.items()
    ]
    for row in rows:
        print(json.dumps(row))
    record = {
        "device": platform.processor() or platform.machine(),
        "commit": current_commit(),
        "base": subprocess.run(["git", "rev-parse", base_rev], capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__,
        "command": "PYTHONPATH=. python " + shlex.join(sys.argv),
        "rows": rows,
    }
    Path(out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 3)
