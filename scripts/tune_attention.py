"""Decode and prefill attention on the GPU: every launch config of a grid (keys per iteration, warps, pipeline
stages; queries per program for prefill; parts per context for small decode batches) timed on the workloads
the engine runs, against the launchers' defaults in the same run. Each config's output is checked against
the default's, and the default's against the float32 reference.

    PYTHONPATH=. python scripts/tune_attention.py OUT.json [--quick]

Workloads: batch-1 and batch-32 decode of a Llama-2-7B shape (32 kv heads) at 576 tokens (pp512 + tg128's
middle), batch 1 at 4096; the offline serving benchmark's decode step on a Llama-3-8B shape (1000 sequences,
8 kv heads, the synthesized lengths); prefill of 16384 tokens of ~250-token prompts (its mixed steps), one
512-token prompt (pp512) and one 4096-token prompt (the kernel bench's row against SDPA). Decode timings use
rotating copies of the cache where one fits in L2, as a model's other layers flush it between two calls.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import shlex
import sys
import time
from dataclasses import asdict

import torch

from perfxllm.bench import current_commit
from perfxllm.bench.kernels import _paged_setup, _rel_err, _rotating
from perfxllm.kernels._common import _compile_all, num_sms, time_in_graph
from perfxllm.kernels.paged_decode_attention import (
    DecodeConfig,
    decode_config,
    max_partitions,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from perfxllm.kernels.rope_attention_prefill import (
    PrefillConfig,
    prefill_attention,
    prefill_config,
    prefill_tiles,
)

D, BLOCK_SIZE = 128, 16


def serving_lengths(num: int, seed: int = 0) -> list[int]:
    """Context lengths of the offline benchmark's sequences midway: prompt ~200 plus half of output ~150."""
    rng = random.Random(seed)
    return [
        max(
            8,
            min(2048, round(rng.lognormvariate(math.log(200), 0.5) + rng.lognormvariate(math.log(75), 0.5))),
        )
        for _ in range(num)
    ]


def decode_workloads(quick: bool) -> list[dict]:
    work = [
        {"name": "llama2-7b b1 ctx576", "hq": 32, "hkv": 32, "lens": [576]},
        {"name": "llama2-7b b1 ctx4096", "hq": 32, "hkv": 32, "lens": [4096]},
        {"name": "llama2-7b b32 ctx576", "hq": 32, "hkv": 32, "lens": [576 - i % 7 for i in range(32)]},
        {"name": "llama3-8b b1000 serving", "hq": 32, "hkv": 8, "lens": serving_lengths(1000)},
        {"name": "llama3-8b b256 serving", "hq": 32, "hkv": 8, "lens": serving_lengths(256, 1)},
    ]
    return work[:1] + work[3:4] if quick else work


def prefill_workloads(quick: bool) -> list[dict]:
    rng = random.Random(2)
    lens: list[int] = []
    while sum(lens) < 16384:
        lens.append(max(4, min(800, round(rng.lognormvariate(math.log(200), 0.6)))))
    lens[-1] -= sum(lens) - 16384
    work = [
        {"name": "llama3-8b 16384 tokens of short prompts", "hq": 32, "hkv": 8, "lens": lens},
        {"name": "llama2-7b pp512", "hq": 32, "hkv": 32, "lens": [512]},
        {"name": "llama3-8b one 4096 prompt", "hq": 32, "hkv": 8, "lens": [4096]},
    ]
    return work[:1] if quick else work


def decode_grid(quick: bool) -> list[DecodeConfig]:
    """128 keys with 8 warps too: with 4, ptxas gives the 128 x 128 tile 32 registers and a 3.8 KB stack of
    spills (offline sm_90 build; 255 registers and 256 bytes with 8 warps)."""
    sizes = (32, 64) if quick else (16, 32, 64, 128)
    return [DecodeConfig(n, w, s) for n, w, s in itertools.product(sizes, (2, 4, 8), (1, 2, 3, 4))]


def prefill_grid(quick: bool) -> list[PrefillConfig]:
    return [
        PrefillConfig(q, n, w, s)
        for q, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
        if not quick or (n == 64 and s == 3)
    ]


def timed(fn) -> float:
    """Microseconds: the median of 10 replays of a CUDA graph of about 10 ms of calls."""
    try:
        return time_in_graph(fn, rep_ms=10) * 1e3
    except Exception as e:  # out of shared memory or registers: not a candidate
        print(f"    skipped: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return float("inf")


def run_decode(w: dict, grid: list[DecodeConfig]) -> dict:
    hq, hkv, lens = w["hq"], w["hkv"], w["lens"]
    batch, max_len = len(lens), max(lens)
    q = torch.randn(batch, hq, D, device="cuda").half()
    cl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    nbytes = 4 * sum(lens) * hkv * D
    rotate = _rotating(lambda: (q, *_paged_setup(lens, hkv, D, BLOCK_SIZE), cl), nbytes)
    kc, vc, tables = _paged_setup(lens, hkv, D, BLOCK_SIZE)
    ref = paged_decode_attention_ref(q, kc, vc, tables, cl)
    default = paged_decode_attention(q, kc, vc, tables, cl, max_len)
    err = _rel_err(default, ref)
    sms = num_sms(q.device)
    default_cfg = decode_config(batch * hkv, sms)

    def call(cfg: DecodeConfig, parts: int | None):
        return rotate(
            lambda q, kc, vc, t, c: paged_decode_attention(
                q, kc, vc, t, c, max_len, partitions=parts, config=cfg
            )
        )

    _compile_all(grid, lambda cfg: call(cfg, None)(), lambda cfg: cfg)
    rows = []
    for cfg in grid:
        try:
            e = _rel_err(paged_decode_attention(q, kc, vc, tables, cl, max_len, config=cfg), default.float())
        except Exception as ex:
            print(f"    {cfg}: {type(ex).__name__}", flush=True)
            continue
        rows.append({**asdict(cfg), "partitions": None, "us": timed(call(cfg, None)), "err_vs_default": e})
    rows.sort(key=lambda r: r["us"])
    if batch * hkv < 2 * sms:  # the part count matters where the sequences alone do not fill the GPU
        most = max_partitions(hq, hkv)
        for r in rows[:3]:
            cfg = DecodeConfig(r["block_n"], r["num_warps"], r["num_stages"])
            for parts in sorted({p for p in (1, 2, 4, 8, 16, 32, 64) if p <= most}):
                e = _rel_err(
                    paged_decode_attention(q, kc, vc, tables, cl, max_len, partitions=parts, config=cfg),
                    default.float(),
                )
                rows.append(
                    {**asdict(cfg), "partitions": parts, "us": timed(call(cfg, parts)), "err_vs_default": e}
                )
        rows.sort(key=lambda r: r["us"])
    default_us = timed(call(default_cfg, None))
    gbps = nbytes / (rows[0]["us"] * 1e3)
    print(
        f"  {w['name']}: default {default_us:.2f} us, best {rows[0]['us']:.2f} us {rows[0]} ({gbps:.0f} GB/s)",
        flush=True,
    )
    return {
        "name": w["name"],
        "batch": batch,
        "hq": hq,
        "hkv": hkv,
        "tokens": sum(lens),
        "kv_bytes": nbytes,
        "default": {**asdict(default_cfg), "us": default_us, "err_vs_ref": err},
        "rows": rows,
    }


def run_prefill(w: dict, grid: list[PrefillConfig]) -> dict:
    hq, hkv, lens = w["hq"], w["hkv"], w["lens"]
    t = sum(lens)
    kc, vc, tables = _paged_setup(lens, hkv, D, BLOCK_SIZE)
    q = torch.randn(t, hq, D, device="cuda").half()
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device="cuda")
    cached = torch.zeros(len(lens), dtype=torch.int32, device="cuda")
    tiles_for = {
        bq: torch.tensor(prefill_tiles(lens, block_q=bq), dtype=torch.int32, device="cuda").view(-1, 2)
        for bq in {c.block_q for c in [*grid, prefill_config()]}
    }

    def call(cfg: PrefillConfig):
        return lambda: prefill_attention(q, kc, vc, cu, cached, tables, tiles_for[cfg.block_q], config=cfg)

    default = call(prefill_config())()
    # the reference: causal SDPA per prompt on the same (already rotated) q and the cache's k, v
    ref = torch.empty(t, hq, D, device="cuda")
    for b, (s0, s1) in enumerate(itertools.pairwise(cu.tolist())):
        pos = torch.arange(s1 - s0, device="cuda")
        slots = tables[b, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
        k = kc.view(-1, hkv, D)[slots].float().transpose(0, 1)
        v = vc.view(-1, hkv, D)[slots].float().transpose(0, 1)
        ref[s0:s1] = torch.nn.functional.scaled_dot_product_attention(
            q[s0:s1].float().transpose(0, 1), k, v, is_causal=True, enable_gqa=True
        ).transpose(0, 1)
    err = _rel_err(default, ref)
    _compile_all(grid, lambda cfg: call(cfg)(), lambda cfg: cfg)
    rows = []
    for cfg in grid:
        try:
            e = _rel_err(call(cfg)(), default.float())
        except Exception as ex:
            print(f"    {cfg}: {type(ex).__name__}", flush=True)
            continue
        rows.append({**asdict(cfg), "us": timed(call(cfg)), "err_vs_default": e})
    rows.sort(key=lambda r: r["us"])
    default_us = timed(call(prefill_config()))
    flops = sum(4.0 * hq * D * n * (n + 1) / 2 for n in lens)
    print(
        f"  {w['name']}: default {default_us:.1f} us, best {rows[0]['us']:.1f} us {rows[0]} "
        f"({flops / rows[0]['us'] / 1e6:.0f} TFLOP/s)",
        flush=True,
    )
    return {
        "name": w["name"],
        "tokens": t,
        "prompts": len(lens),
        "hq": hq,
        "hkv": hkv,
        "flops": flops,
        "default": {**asdict(prefill_config()), "us": default_us, "err_vs_ref": err},
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--quick", action="store_true", help="a few workloads and configs (a smoke test)")
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.time()
    result = {
        "device": torch.cuda.get_device_name(),
        "commit": current_commit(),
        "command": shlex.join(["python", *sys.argv]),
        "torch": torch.__version__,
        "decode": [],
        "prefill": [],
    }
    print("decode attention", flush=True)
    for w in decode_workloads(args.quick):
        result["decode"].append(run_decode(w, decode_grid(args.quick)))
    print("prefill attention", flush=True)
    for w in prefill_workloads(args.quick):
        result["prefill"].append(run_prefill(w, prefill_grid(args.quick)))
    result["seconds"] = time.time() - start
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
