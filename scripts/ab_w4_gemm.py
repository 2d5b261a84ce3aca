"""A/B of int4 tensor-core kernels at small N on the GPU: copies of the w4a16_matmul module (other commits'),
each launched with fixed block shapes on a 12288 x 4096 g128 weight at N = 16, 32 and 64, beside cuBLAS fp16,
timed like the kernel bench (CUDA graphs over rotating weight copies) and checked against float32.

    git show REV:perfxllm/kernels/w4a16_matmul.py > /tmp/w4_rev.py
    PYTHONPATH=. python scripts/ab_w4_gemm.py OUT.json new=/tmp/w4_rev.py old=perfxllm/kernels/w4a16_matmul.py

A module with the per-nibble kernel (f11972e to ba8876c) gets the shapes as listed, in K tiles of 128; any
other, K tiles of 64, 4 warps and at most 128 rows (the kernel of 0e9531a). The launchers take each other's
packed weights (one layout).
"""

from __future__ import annotations

import json
import sys
from types import ModuleType

import torch
import torch.nn.functional as F
from ab_w4_gemv import load_module

from perfxllm.bench import current_commit
from perfxllm.bench.kernels import _bench, _random_int4, _rel_err, _w4_rotating
from perfxllm.kernels import w4a16_matmul as w4

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


def config(mod: ModuleType, bn: int, bm: int, warps: int, stages: int, split: int) -> dict:
    if hasattr(mod, "_byte_dots"):  # the per-nibble kernel: K tiles of 128
        return dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=128, SPLIT_K=split, num_warps=warps, num_stages=stages)
    return dict(BLOCK_N=bn, BLOCK_M=min(bm, 128), BLOCK_K=64, SPLIT_K=split, num_warps=4, num_stages=stages)


def main(out: str, variants: list[str]) -> None:
    mods = {name: load_module(path, f"w4a16_{name}") for name, path in (v.split("=", 1) for v in variants)}
    w = _random_int4(M, K, 128, "cuda")
    packed, ref_w = w4.prepack(w), w.dequantize(torch.float32)
    rot, _ = _w4_rotating(M, K)
    rows = []
    for n, shapes in SHAPES.items():
        x = torch.randn(n, K, device="cuda").half()
        ref = x.float() @ ref_w.t()
        rows.append(dict(variant="cublas", n=n, us=round(_bench(rot(lambda _, d, x=x: F.linear(x, d))), 2)))
        print(rows[-1], flush=True)
        for name, mod in mods.items():
            for shape in shapes:
                cfg = config(mod, *shape)
                err = _rel_err(mod._launch_gemm(x, packed, cfg), ref)
                us = _bench(rot(lambda q, _, mod=mod, x=x, cfg=cfg: mod._launch_gemm(x, q, cfg)))
                rows.append(dict(variant=name, n=n, config=cfg, us=round(us, 2), rel_err=err))
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
