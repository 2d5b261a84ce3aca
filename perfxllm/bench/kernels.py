"""`perfxllm bench kernels`: check every Triton kernel at real sizes against its reference on the GPU, time
it next to its torch baseline and the device-to-device copy bandwidth, and write
<out-dir>/kernels-<gpu>.json and .png.

Timing: medians of CUDA-graph replays (perfxllm.kernels._common.time_in_graph), so that kernels of a few
microseconds are timed as the decode graphs run them, not with Python's launch overhead; inputs rotate
among enough copies that the weights never sit in L2 between runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from perfxllm.bench import copy_gbps, current_commit
from perfxllm.errors import PerfxError

W4_M, W4_K = 12288, 4096
GEMV_SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # (M out, K in)


def _bench(fn: Callable[[], object]) -> float:
    """Microseconds."""
    from perfxllm.kernels._common import time_in_graph

    return time_in_graph(fn, rep_ms=100) * 1000.0


def _rotating(make: Callable[[], tuple], nbytes: int) -> Callable[[Callable], Callable[[], object]]:
    """Enough copies of the inputs (from make()) that two calls in a row never share them in L2."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = [make() for _ in range(min(8, max(2, math.ceil(2 * l2 / max(nbytes, 1)) + 1)))]
    cycle = itertools.cycle(copies)
    return lambda fn: lambda: fn(*next(cycle))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def _random_int4(m: int, k: int, g: int, device: str) -> object:
    from perfxllm.quant.formats import Int4Weight, pack_int4

    wq = torch.randint(0, 16, (m, k), dtype=torch.uint8, device=device)
    scales = (torch.rand(m, k // g, device=device) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 16, (m, k // g), dtype=torch.uint8, device=device)
    return Int4Weight(pack_int4(wq), scales, pack_int4(zeros), g)


def _w4_rotating(m: int, k: int) -> tuple[Callable[[Callable], Callable[[], object]], int]:
    """_rotating over (packed int4 g128 weight, fp16 weight) pairs of one shape, and the int4 weight's bytes
    (nibbles, fp16 scales and biases)."""
    from perfxllm.kernels import w4a16_matmul as w4

    def make() -> tuple:
        return w4.prepack(_random_int4(m, k, 128, "cuda")), torch.randn(m, k, device="cuda").half()

    nbytes = m * k // 2 + 2 * 2 * m * k // 128
    return _rotating(make, nbytes), nbytes


class Runner:
    def __init__(self, copy_gbps: float) -> None:
        self.rows: list[dict] = []
        self.checks: list[tuple[str, float, float]] = []
        self.copy_gbps = copy_gbps

    def check(self, name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
        err = _rel_err(out, ref)
        self.checks.append((name, err, tol))
        print(
            f"check {name:48s} rel_err {err:.2e} (tol {tol:.0e}) {'ok' if err < tol else 'FAIL'}", flush=True
        )

    def row(
        self, op: str, m: int, k: int, n: int, us: float, base: float | None, nbytes: float, flops: float
    ):
        r = dict(op=op, M=m, K=k, N=n, us=round(us, 2), baseline_us=None if base is None else round(base, 2))
        r["gbps"] = round(nbytes / us / 1e3, 1)
        r["tflops"] = round(flops / us / 1e6, 2)
        r["copy_fraction"] = round(r["gbps"] / self.copy_gbps, 3)
        self.rows.append(r)
        speed = "" if base is None else f" x{base / us:5.2f} vs torch"
        print(
            f"{op:22s} M={m:6d} K={k:6d} N={n:5d} {us:9.2f} us {r['gbps']:7.0f} GB/s {r['tflops']:6.1f} TF{speed}"
        )


def bench_w4(r: Runner) -> None:
    from perfxllm.kernels import w4a16_matmul as w4

    for dtype, tol in ((torch.float16, 3e-3), (torch.bfloat16, 1e-2)):
        w = _random_int4(W4_M, W4_K, 128, "cuda")
        ref_w = w.dequantize(torch.float32)
        p = w4.prepack(w)
        for n in (1, 7, 16, 17, 1024):
            x = torch.randn(n, W4_K, device="cuda").to(dtype)
            out = torch.full((n, W4_M), float("nan"), device="cuda", dtype=dtype)
            w4.w4a16_matmul(x, p, out=out)
            r.check(f"w4a16 {dtype} N={n}", out, x.float() @ ref_w.t(), tol)
    for g in (32, 64):
        w = _random_int4(4096, 4096, g, "cuda")
        x = torch.randn(3, 4096, device="cuda").half()
        r.check(f"w4a16 g{g} N=3", w4.w4a16_matmul(x, w4.prepack(w)), x.float() @ w.dequantize().t(), 3e-3)

    def time_w4(m: int, k: int, n: int, op: str, baseline: bool) -> None:
        x = torch.randn(n, k, device="cuda").half()
        rot, wbytes = _w4_rotating(m, k)
        us = _bench(rot(lambda p, _: w4.w4a16_matmul(x, p)))
        base = _bench(rot(lambda _, d: F.linear(x, d))) if baseline else None
        r.row(op, m, k, n, us, base, wbytes + 2 * n * (k + m), 2.0 * m * n * k)

    for n in [2**i for i in range(13)]:
        time_w4(W4_M, W4_K, n, "w4a16", True)
    for m, k in GEMV_SHAPES:
        time_w4(m, k, 1, "w4a16_gemv", False)


def bench_w8(r: Runner) -> None:
    from perfxllm.kernels import w8a16_matmul as w8
    from perfxllm.quant.formats import Int8Weight

    def make() -> tuple:
        q = torch.randint(-128, 128, (W4_M, W4_K), dtype=torch.int8, device="cuda")
        w = Int8Weight(q, (torch.rand(W4_M, device="cuda") * 0.01).half())
        return w8.prepack(w), w

    for n in (1, 16, 1024):
        rot = _rotating(make, W4_M * W4_K)
        x = torch.randn(n, W4_K, device="cuda").half()
        p, w = make()
        r.check(f"w8a16 N={n}", w8.w8a16_matmul(x, p), x.float() @ w.dequantize().t(), 3e-3)
        us = _bench(rot(lambda p, _, x=x: w8.w8a16_matmul(x, p)))
        r.row("w8a16", W4_M, W4_K, n, us, None, W4_M * W4_K + 2 * n * (W4_K + W4_M), 2.0 * W4_M * n * W4_K)


def bench_elementwise(r: Runner) -> None:
    from perfxllm.kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_ref
    from perfxllm.kernels.silu_mul import silu_mul, silu_mul_ref

    t, h = 8192, 4096
    w = torch.rand(h, device="cuda").half() + 0.5
    x, res = torch.randn(t, h, device="cuda").half(), torch.randn(t, h, device="cuda").half()
    out, new_res = add_rmsnorm(x, res, w, 1e-6)
    ref, ref_res = add_rmsnorm_ref(x, res, w, 1e-6)
    r.check("add_rmsnorm", out, ref, 2e-3)
    r.check("add_rmsnorm residual", new_res, ref_res, 1e-6)

    def unfused(x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        hsum = x + res
        hf = hsum.float()
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).half() * w

    rot = _rotating(
        lambda: (torch.randn(t, h, device="cuda").half(), torch.randn(t, h, device="cuda").half()), 4 * t * h
    )
    us = _bench(rot(lambda a, b: add_rmsnorm(a, b, w, 1e-6)))
    r.row("add_rmsnorm", h, h, t, us, _bench(rot(unfused)), 8 * t * h, 0)

    inter = 11008
    g = torch.randn(t // 2, 2 * inter, device="cuda").half()
    r.check("silu_mul", silu_mul(g), silu_mul_ref(g), 1e-3)
    rot = _rotating(lambda: (torch.randn(t // 2, 2 * inter, device="cuda").half(),), 2 * t * inter)
    us = _bench(rot(silu_mul))
    base = _bench(rot(lambda a: F.silu(a[:, :inter]) * a[:, inter:]))
    r.row("silu_mul", inter, 2 * inter, t // 2, us, base, 3 * t // 2 * inter * 2, 0)


def _paged_setup(
    lens: list[int],
    hkv: int,
    d: int,
    block_size: int = 16,
    device: str = "cuda",
    dtype: torch.dtype = torch.half,
) -> tuple:
    """Random k and v caches and block tables for contexts of `lens`, the blocks shuffled."""
    blocks_per_seq = [-(-n // block_size) for n in lens]
    total = sum(blocks_per_seq)
    k_cache = torch.randn(total + 8, block_size, hkv, d, device=device).to(dtype)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(total + 8, device=device).to(torch.int32)
    tables = torch.zeros(len(lens), max(blocks_per_seq), dtype=torch.int32, device=device)
    start = 0
    for b, nb in enumerate(blocks_per_seq):
        tables[b, :nb] = perm[start : start + nb]
        start += nb
    return k_cache, v_cache, tables


def bench_attention(r: Runner) -> None:
    from perfxllm.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
    from perfxllm.kernels.rope_attention_prefill import (
        prefill_attention,
        prefill_tiles,
        rope_attention_prefill,
        rope_attention_prefill_ref,
    )
    from perfxllm.kernels.rope_cache_write import rope_cache_write
    from perfxllm.layers.rotary import rope_cos_sin_cache

    hq, hkv, d, bs = 32, 8, 128, 16
    cs = rope_cos_sin_cache(d, 8192, 500000.0).cuda()
    for cached, new in (([0, 256, 1000], [512, 300, 77]), ([0], [4096])):
        lens = [c + n for c, n in zip(cached, new)]
        kc, vc, tables = _paged_setup(lens, hkv, d, bs)
        t = sum(new)
        q = torch.randn(t, hq, d, device="cuda").half()
        k, v = torch.randn(t, hkv, d, device="cuda").half(), torch.randn(t, hkv, d, device="cuda").half()
        positions = torch.cat([c + torch.arange(n) for c, n in zip(cached, new)]).cuda()
        seq = torch.repeat_interleave(torch.arange(len(new)), torch.tensor(new)).cuda()
        slots = tables[seq, positions // bs].long() * bs + positions % bs
        cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        cached_t = torch.tensor(cached, dtype=torch.int32, device="cuda")
        ref = rope_attention_prefill_ref(q, k, v, positions, cs, kc, vc, cu, cached_t, tables)
        args = (q, k, v, positions, cs, kc, vc, slots, cu, cached_t, tables)
        r.check(f"prefill attention new={new} cached={cached}", rope_attention_prefill(*args), ref, 3e-3)
    # timing: one 4096-token sequence, causal, vs SDPA (flash) on contiguous q/k/v
    q_rot = torch.randn(t, hq, d, device="cuda").half()
    tiles = torch.tensor(prefill_tiles(new), dtype=torch.int32, device="cuda").view(-1, 2)
    us = _bench(lambda: prefill_attention(q_rot, kc, vc, cu, cached_t, tables, tiles))
    qs, ks = q_rot.transpose(0, 1)[None], torch.randn(1, hkv, t, d, device="cuda").half()
    base = _bench(lambda: F.scaled_dot_product_attention(qs, ks, ks, is_causal=True, enable_gqa=True))
    flops = 4.0 * hq * d * t * t / 2
    r.row("prefill_attention", hq, d, t, us, base, 2 * t * d * (2 * hq + 2 * hkv), flops)
    us_all = _bench(  # rope_attention_prefill itself reads the lengths back to the host: not in a graph
        lambda: prefill_attention(rope_cache_write(*args[:8]), kc, vc, cu, cached_t, tables, tiles)
    )
    r.row("rope+prefill_attention", hq, d, t, us_all, base, 2 * t * d * (2 * hq + 4 * hkv), flops)

    for batch, ctx in ((64, 2048), (8, 8192), (1, 4096)):
        lens = [ctx - (i * 37) % 100 for i in range(batch)]
        kc, vc, tables = _paged_setup(lens, hkv, d, bs)
        q = torch.randn(batch, hq, d, device="cuda").half()
        cl = torch.tensor(lens, dtype=torch.int32, device="cuda")
        ref = paged_decode_attention_ref(q, kc, vc, tables, cl)
        r.check(
            f"decode attention B={batch} ctx~{ctx}",
            paged_decode_attention(q, kc, vc, tables, cl, max(lens)),
            ref,
            3e-3,
        )
        args = (q, kc, vc, tables, cl, max(lens))
        us = _bench(lambda args=args: paged_decode_attention(*args))
        kv_bytes = 2 * 2 * sum(lens) * hkv * d
        r.row("decode_attention", hq, d, batch, us, None, kv_bytes, 4.0 * sum(lens) * hq * d)


def bench_sampling(r: Runner) -> None:
    from perfxllm.kernels.sampling import SamplingSettings, sample, truncated_probs, truncated_probs_ref

    batch, vocab = 64, 128256
    logits = torch.randn(batch, vocab, device="cuda") * 3
    cases = {  # top_k, top_p of every row: the three paths (no sort, topk, full sort)
        "sampling_temperature": (0, 1.0),
        "sampling_top_k": (50, 0.9),
        "sampling_top_p": (0, 0.9),
    }
    for op, (top_k, top_p) in cases.items():
        rows = ([0.8] * batch, [top_k] * batch, [top_p] * batch, [0.0] * batch)
        settings = SamplingSettings(*rows, vocab, logits.device)
        ref = torch.stack([truncated_probs_ref(logits[i], *(v[i] for v in rows)) for i in range(2)])
        r.check(f"{op} rows 0-1", truncated_probs(logits, settings)[:2], ref, 1e-5)
        us = _bench(lambda settings=settings: sample(logits, settings))
        r.row(op, vocab, 0, batch, us, None, 4 * batch * vocab, 0)
    greedy = [0.0] * 8 + [0.8] * (batch - 8)
    settings = SamplingSettings(greedy, [50] * batch, [0.9] * batch, [0.0] * batch, vocab, logits.device)
    tokens = sample(logits, settings)
    greedy_ok = bool((tokens[:8] == logits[:8].argmax(-1)).all())
    r.checks.append(("sampling greedy rows", 0.0 if greedy_ok else 1.0, 0.5))


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["op"] == "w4a16"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ns = [r["N"] for r in rows]
    ax1.loglog(ns, [r["us"] for r in rows], "o-", label="w4a16 (Triton, int4 g128)")
    ax1.loglog(ns, [r["baseline_us"] for r in rows], "s-", label="F.linear fp16 (cuBLAS)")
    ax1.set(xlabel="N (tokens)", ylabel="time (us)", title=f"M={W4_M}, K={W4_K} on {result['device']}")
    ax1.legend()
    ax1.grid(True, which="both", alpha=0.3)
    mem = [
        r for r in result["rows"] if r["op"] in ("w4a16_gemv", "add_rmsnorm", "silu_mul", "decode_attention")
    ]
    labels = [f"{r['op']}\n{r['M']}x{r['K']} N={r['N']}" for r in mem]
    ax2.barh(labels, [r["gbps"] for r in mem])
    ax2.axvline(result["copy_gbps"], color="k", ls="--", label=f"copy {result['copy_gbps']:.0f} GB/s")
    ax2.axvline(0.8 * result["copy_gbps"], color="r", ls=":", label="80% of copy")
    ax2.set(xlabel="GB/s", title="memory-bound kernels")
    ax2.tick_params(axis="y", labelsize=7)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--out-dir", default="benchmarks/results", help="where kernels-<gpu>.json and .png go")
    ap.add_argument("--only", nargs="*", default=None, help="subset: w4 w8 elementwise attention sampling")


def main(argv: list[str]) -> int:
    """scripts/gpu_check_kernels.py's entry: the same options as `perfxllm bench kernels`."""
    ap = argparse.ArgumentParser(prog="perfxllm bench kernels", description=__doc__)
    add_arguments(ap)
    return run(ap.parse_args(argv), "perfxllm bench kernels " + " ".join(argv))


def run(args: argparse.Namespace, command: str) -> int:
    if not torch.cuda.is_available():
        raise PerfxError("perfxllm bench kernels needs a CUDA GPU")
    import triton

    from perfxllm.kernels.pdl import pdl_enabled

    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(0)
    gpu = next((g for g in ("h100", "h200", "a100", "l40s", "4090") if g in name.lower()), "gpu")
    copy = copy_gbps(torch.device("cuda"))
    print(f"{name}: device-to-device copy {copy:.0f} GB/s", flush=True)
    r = Runner(copy)
    sections = {
        "w4": bench_w4,
        "w8": bench_w8,
        "elementwise": bench_elementwise,
        "attention": bench_attention,
        "sampling": bench_sampling,
    }
    for key, fn in sections.items():
        if args.only is None or key in args.only:
            try:
                fn(r)
            except Exception:  # report and go on: one broken kernel should not hide the others' numbers
                traceback.print_exc()
                r.checks.append((f"{key} raised", float("inf"), 0.0))
    result = dict(
        device=name,
        commit=current_commit(),
        torch=torch.__version__,
        triton=triton.__version__,
        command=command,
        copy_gbps=round(copy, 1),
        pdl=pdl_enabled(torch.device("cuda")),
        checks=[dict(name=n, rel_err=e, tol=t, ok=e < t) for n, e, t in r.checks],
        rows=r.rows,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels-{gpu}.json").write_text(json.dumps(result, indent=1))
    _plot(result, out / f"kernels-{gpu}.png")
    failed = [n for n, e, t in r.checks if not e < t]
    print(
        f"{len(r.checks) - len(failed)}/{len(r.checks)} checks ok" + (f"; FAILED: {failed}" if failed else "")
    )
    return 1 if failed else 0
