"""A/B of the int4 GEMV (N = 1) on the GPU, one machine, one run: this tree's kernel against a baseline copy of
the module (another commit's), each with K tiles of at most one group and of several groups, and optionally
the float32 products (bf16's path) and this tree's kernel without programmatic dependent launch. Each variant
is tuned over its own module's candidates by the library's tuner, then timed on rotating weight copies beside
cuBLAS fp16, and checked against the float32 reference, also with activations of a few hundred.

    git show REV:perfxllm/kernels/w4a16_matmul.py > /tmp/w4_base.py
    PYTHONPATH=. python scripts/ab_w4_gemv.py OUT.json [--baseline /tmp/w4_base.py] [--f32] [--no-pdl]
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import time
from types import ModuleType

import torch
import torch.nn.functional as F

from perfxllm.bench import copy_gbps
from perfxllm.bench.kernels import GEMV_SHAPES, _bench, _random_int4, _rel_err, _w4_rotating
from perfxllm.kernels import w4a16_matmul as w4
from perfxllm.kernels._common import num_sms


def load_module(path: str, name: str = "w4a16_baseline") -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def gemv_configs(mod: ModuleType, m: int, k: int, sms: int, dtype: torch.dtype) -> list[dict]:
    if "pdl" in inspect.signature(mod._gemv_configs).parameters:  # not in a baseline from before PDL
        return mod._gemv_configs(m, k, 128, sms, dtype, mod.pdl_enabled(torch.device("cuda")))
    return mod._gemv_configs(m, k, 128, sms, dtype)


def variant(
    mod: ModuleType, p, ref_w: torch.Tensor, x: torch.Tensor, cands: list[dict], key: str, rot
) -> dict:
    def own(q):  # the same layout in the module's own class (its launcher checks the class)
        return mod.W4Packed(**vars(q))

    cold_weight = w4._cold_weights(p)  # this tree's, for a baseline's too
    p = own(p)
    cfg = mod._tuner.pick(  # a baseline may lack _build
        key,
        lambda: cands,
        lambda c: mod.w4a16_matmul(x, own(cold_weight()), config=c),
        getattr(mod, "_build", repr),
    )
    errs = []
    for scale in (1.0, 300.0):  # larger x overflows fp16 outputs of K = 4096-11008
        xs = (x.float() * scale).half()
        errs.append(_rel_err(mod.w4a16_matmul(xs, p, config=cfg).float(), xs.float() @ ref_w.t()))
    us = _bench(rot(lambda q, _: mod.w4a16_matmul(x, own(q), config=cfg)))
    return dict(us=round(us, 2), rel_err=errs, config=cfg)


def ab_shape(
    m: int, k: int, sms: int, variants: dict[str, tuple[ModuleType, torch.dtype, bool, bool]]
) -> dict:
    t0 = time.time()
    w = _random_int4(m, k, 128, "cuda")
    p = w4.prepack(w)  # the packed layout is the same in both modules
    ref_w = w.dequantize(torch.float32)
    x = torch.randn(1, k, device="cuda").half()
    rot, wbytes = _w4_rotating(m, k)
    row = dict(M=m, K=k, N=1, cublas_us=round(_bench(rot(lambda _, d: F.linear(x, d))), 2))
    print(f"M={m} K={k}: cuBLAS fp16 {row['cublas_us']} us", flush=True)
    for tag, (mod, dtype, wide, pdl) in variants.items():
        os.environ["PERFXLLM_PDL"] = "1" if pdl else "0"
        cands = [c for c in gemv_configs(mod, m, k, sms, dtype) if (c["BLOCK_K"] > 128) == wide]
        v = row[tag] = variant(mod, p, ref_w, x, cands, f"ab:{m}:{k}:{tag}", rot)
        v["gbps"] = round(wbytes / v["us"] / 1e3, 1)
        print(
            f"  {tag:14s} {v['us']:7.2f} us {v['gbps']:6.0f} GB/s rel_err {v['rel_err']} {v['config']}",
            flush=True,
        )
    row["seconds"] = round(time.time() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--baseline", help="a copy of perfxllm/kernels/w4a16_matmul.py to compare against")
    ap.add_argument("--f32", action="store_true", help="also the float32 products (the list of bf16 x)")
    ap.add_argument("--no-pdl", action="store_true", help="also this tree's kernel without PDL")
    args = ap.parse_args()
    modules = {"": (w4, True)}
    modules |= {"nopdl_": (w4, False)} if args.no_pdl else {}
    modules |= {"base_": (load_module(args.baseline), False)} if args.baseline else {}
    dtypes = {"pairs": torch.float16} | ({"f32": torch.bfloat16} if args.f32 else {})  # bf16's list: no pairs
    variants = {
        f"{prefix}{name}{'_wide' if wide else ''}": (mod, dtype, wide, pdl)
        for prefix, (mod, pdl) in modules.items()
        for name, dtype in dtypes.items()
        for wide in (False, True)
    }
    dev = torch.device("cuda")
    sms, bw = num_sms(dev), copy_gbps(dev)
    print(f"{torch.cuda.get_device_name()}: copy {bw:.0f} GB/s", flush=True)
    result = dict(
        device=torch.cuda.get_device_name(),
        commit=os.environ.get("PERFXLLM_COMMIT"),
        command="python scripts/ab_w4_gemv.py " + " ".join(sys.argv[1:]),
        versions=dict(torch=torch.__version__, triton=__import__("triton").__version__),
        copy_gbps=bw,
        rows=[],
    )
    for m, k in GEMV_SHAPES:  # most of the time is tuning: the file is rewritten after each shape
        result["rows"].append(ab_shape(m, k, sms, variants))
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
