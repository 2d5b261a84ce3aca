"""A/B of the int4 GEMV (N = 1) on the GPU: products in float32 against fp16 pairs in PTX, each with K tiles
of at most one group and of several groups. Each variant is tuned over its own candidates by the library's
tuner, then timed on rotating weight copies beside cuBLAS fp16, and checked against the float32 reference,
also with activations of a few thousand.

    PYTHONPATH=. python scripts/ab_w4_gemv.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from perfxllm.bench import copy_gbps
from perfxllm.bench.kernels import GEMV_SHAPES, _bench, _random_int4, _rel_err, _rotating
from perfxllm.kernels import w4a16_matmul as w4
from perfxllm.kernels._common import num_sms


def variant(p, ref_w: torch.Tensor, x: torch.Tensor, cands: list[dict], key: str, rot, wbytes: int) -> dict:
    weights = w4._cold_weights(p)
    cfg = w4._tuner.pick(key, lambda: cands, lambda c: w4.w4a16_matmul(x, next(weights), config=c))
    errs = []
    for scale in (1.0, 3000.0):
        xs = (x.float() * scale).half()
        errs.append(_rel_err(w4.w4a16_matmul(xs, p, config=cfg).float(), xs.float() @ ref_w.t()))
    us = _bench(rot(lambda q, _: w4.w4a16_matmul(x, q, config=cfg)))
    return dict(us=round(us, 2), gbps=round(wbytes / us / 1e3, 1), rel_err=errs, config=cfg)


def ab_shape(m: int, k: int, sms: int) -> dict:
    t0 = time.time()
    w = _random_int4(m, k, 128, "cuda")
    p = w4.prepack(w)
    ref_w = w.dequantize(torch.float32)
    x = torch.randn(1, k, device="cuda").half()
    wbytes = m * k // 2 + 2 * 2 * m * k // 128
    rot = _rotating(
        lambda: (w4.prepack(_random_int4(m, k, 128, "cuda")), torch.randn(m, k, device="cuda").half()), wbytes
    )
    row = dict(M=m, K=k, N=1, cublas_us=round(_bench(rot(lambda _, d: F.linear(x, d))), 2))
    for name, dtype in (("f32", torch.bfloat16), ("pairs", torch.float16)):  # bf16's list: PAIRS off
        for wide in (False, True):
            cands = [c for c in w4._gemv_configs(m, k, 128, sms, dtype) if (c["BLOCK_K"] > 128) == wide]
            tag = name + ("_wide" if wide else "")
            row[tag] = variant(p, ref_w, x, cands, f"ab:{m}:{k}:{tag}", rot, wbytes)
    row["seconds"] = round(time.time() - t0, 1)
    print(f"M={m} K={k}: cuBLAS fp16 {row['cublas_us']} us", flush=True)
    for tag in ("f32", "f32_wide", "pairs", "pairs_wide"):
        v = row[tag]
        print(
            f"  {tag:10s} {v['us']:7.2f} us {v['gbps']:6.0f} GB/s rel_err {v['rel_err']} {v['config']}",
            flush=True,
        )
    return row


def main(out_path: str) -> None:
    dev = torch.device("cuda")
    sms, bw = num_sms(dev), copy_gbps(dev)
    print(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s", flush=True)
    result = dict(
        device=torch.cuda.get_device_name(),
        commit=os.environ.get("PERFXLLM_COMMIT"),
        command="python scripts/ab_w4_gemv.py " + out_path,
        versions=dict(torch=torch.__version__, triton=__import__("triton").__version__),
        copy_gbps=bw,
        rows=[],
    )
    for m, k in GEMV_SHAPES:  # about 100 s a shape, most of it tuning: the file is rewritten after each
        result["rows"].append(ab_shape(m, k, sms))
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
