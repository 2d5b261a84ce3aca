"""A/B of int4 tensor-core kernels at small N on the GPU: copies of the w4a16_matmul module (other commits'),
each launched with fixed block shapes on a 12288 x 4096 g128 weight at N = 16, 32 and 64, beside cuBLAS fp16.
Each time is the median of 15 replays of a CUDA graph of 20 calls over 4 rotating weight copies (107 MB, more
than the L2), so no launch overhead and no L2-resident weight; each output is checked against float32.

    git show REV:perfxllm/kernels/w4a16_matmul.py > /tmp/w4_rev.py
    PYTHONPATH=. python scripts/ab_w4_gemm.py OUT.json new=/tmp/w4_rev.py old=perfxllm/kernels/w4a16_matmul.py

A module with the per-nibble kernel (f11972e to ba8876c) gets the shapes as listed, in K tiles of 128; any
other, K tiles of 64, 4 warps and at most 128 rows (the kernel of 0e9531a). The launchers take each other's
packed weights (one layout).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

import torch
import torch.nn.functional as F

from perfxllm.bench import current_commit
from perfxllm.bench.kernels import _random_int4

M, K = 12288, 4096
# (BLOCK_N, BLOCK_M, warps, stages, split K)
SHAPES = {
    16: [
        (16, 128, 4, 3, 6),
        (16, 256, 8, 3, 6),
        (16, 256, 8, 4, 3),
        (16, 64, 4, 4, 6),
        (16, 128, 4, 3, 11),
        (16, 64, 4, 3, 11),
        (16, 64, 4, 5, 11),
        (16, 128, 8, 3, 6),
    ],
    32: [(32, 128, 4, 4, 6), (32, 128, 8, 4, 6), (32, 64, 4, 4, 6), (32, 64, 4, 4, 11)],
    64: [(64, 128, 8, 4, 6), (64, 64, 4, 4, 6), (64, 128, 8, 3, 3)],
}


def load_module(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"w4a16_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def graph_us(fn, iters: int = 20, reps: int = 15) -> float:
    """Median time of one call, from replays of a CUDA graph of `iters` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return sorted(times)[len(times) // 2]


def config(mod: ModuleType, bn: int, bm: int, warps: int, stages: int, split: int) -> dict:
    if hasattr(mod, "_byte_dots"):  # the per-nibble kernel: K tiles of 128
        return dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=128, SPLIT_K=split, num_warps=warps, num_stages=stages)
    return dict(BLOCK_N=bn, BLOCK_M=min(bm, 128), BLOCK_K=64, SPLIT_K=split, num_warps=4, num_stages=stages)


def main(out: str, variants: list[str]) -> None:
    mods = {name: load_module(name, path) for name, path in (v.split("=", 1) for v in variants)}
    weights = [_random_int4(M, K, 128, "cuda") for _ in range(4)]
    packed = [next(iter(mods.values())).prepack(w) for w in weights]
    ref_w = weights[0].dequantize(torch.float16)
    rows = []
    for n, shapes in SHAPES.items():
        x = torch.randn(n, K, device="cuda").half()
        ref = x.float() @ ref_w.float().t()
        rows.append(dict(variant="cublas", n=n, us=round(graph_us(lambda x=x: F.linear(x, ref_w)), 2)))
        print(rows[-1], flush=True)
        for name, mod in mods.items():
            for shape in shapes:
                cfg = config(mod, *shape)
                calls = iter(range(10**9))

                def call(mod=mod, x=x, calls=calls, cfg=cfg):  # a weight copy a call, fixed in the graph
                    return mod._launch_gemm(x, packed[next(calls) % 4], cfg)

                out_x = mod._launch_gemm(x, packed[0], cfg)
                err = ((out_x.float() - ref).norm() / ref.norm()).item()
                rows.append(dict(variant=name, n=n, config=cfg, us=round(graph_us(call), 2), rel_err=err))
                print(rows[-1], flush=True)
    record = dict(
        device=torch.cuda.get_device_name(),
        commit=current_commit(),
        torch=torch.__version__,
        command="python scripts/ab_w4_gemm.py " + " ".join([out, *variants]),
        M=M,
        K=K,
        rows=rows,
    )
    with open(out, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
