"""`perfxllm eval ppl`: perplexity over non-overlapping windows of ctx tokens. Each window is scored on its
own (a fresh context), its first token not predicted; the model's own forward gives every position's logits."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from perfxllm.engine.model_runner import prompt_logits
from perfxllm.errors import PerfxError


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    ctx: int


def perplexity(
    model: nn.Module, ids: list[int], ctx: int, max_windows: int | None = None, progress: bool = True
) -> Perplexity:
    windows = len(ids) // ctx
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1 or ctx < 2:
        raise PerfxError(f"the text has {len(ids)} tokens: not one window of --ctx {ctx} tokens")
    total = 0.0
    for w in tqdm(range(windows), desc="perplexity", unit="window", disable=not progress):
        window = ids[w * ctx : (w + 1) * ctx]
        logits = prompt_logits(model, window)
        target = torch.tensor(window[1:], device=logits.device)
        total += float(F.cross_entropy(logits[:-1], target, reduction="sum"))
    tokens = windows * (ctx - 1)
    return Perplexity(math.exp(total / tokens), total / tokens, tokens, windows, ctx)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def code_version() -> dict:
    """The commit of the perfxllm that ran, and the tracked files that differ from it (a result made with
    uncommitted changes says so)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "perfxllm_commit": commit and commit.strip(),
        "uncommitted_changes": None if status is None else [line[3:] for line in status.splitlines()],
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_results(path: str) -> dict:
    """A JSON results file's contents ({} if there is none yet), checked before the evaluation's minutes."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        results = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PerfxError(f"--record {path} is not a JSON results file: {e}") from None
    if not isinstance(results, dict) or not isinstance(results.get("results", {}), dict):
        raise PerfxError(f"--record {path} is not a JSON results file: no 'results' object")
    return results


def record(path: str, results: dict, name: str, entry: dict) -> None:
    """Add (or replace) one named result in results and write them to path."""
    results.setdefault("results", {})[name] = entry
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
    except OSError as e:
        raise PerfxError(f"cannot write --record {path}: {e.strerror or e}") from None


def run_eval_ppl(args: argparse.Namespace) -> int:
    from perfxllm.engine.engine import resolve_device
    from perfxllm.info import weight_bytes_by_format
    from perfxllm.model.loader import build_model, open_checkpoint, resolve_dtype
    from perfxllm.quant.calibration import default_eval_text, read_text

    device = resolve_device(args.device)
    results = read_results(args.record) if args.record else {}
    ckpt = open_checkpoint(args.model, args.random_weights, dequantize=args.dequantize)
    if args.ctx > ckpt.config.max_position_embeddings:
        raise PerfxError(
            f"--ctx {args.ctx} is longer than the model's context {ckpt.config.max_position_embeddings}"
        )
    dtype = resolve_dtype(args.dtype, device, ckpt.config)
    model = build_model(ckpt, device, dtype, max_positions=args.ctx)
    ids = ckpt.tokenizer.encode(read_text(args.text, default_eval_text()), add_bos=False)
    start = time.perf_counter()
    result = perplexity(model, ids, args.ctx, args.max_windows)
    seconds = time.perf_counter() - start
    print(
        f"perplexity {result.ppl:.4f}  ({result.windows} windows of {result.ctx} tokens, "
        f"{result.tokens} predicted, {seconds:.0f} s on {device.type}, {str(dtype).removeprefix('torch.')})"
    )
    if args.record:
        record(
            args.record,
            results,
            args.name or Path(ckpt.path).name,
            {
                **asdict(result),
                "model": ckpt.path,
                "quantization_config": ckpt.config.hf_config.get("quantization_config"),
                "text": args.text or "pydoc_data.topics, held-out last 20%",
                "device": device.type,
                "device_name": device_name(device),
                "activation_dtype": str(dtype).removeprefix("torch."),
                "weight_bytes": weight_bytes_by_format(model),
                "runtime_s": round(seconds, 1),
                "command": shlex.join(["perfxllm", *sys.argv[1:]]),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **code_version(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        )
    return 0
