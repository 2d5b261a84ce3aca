"""W8A16 matmul: y = x @ W.T for fp16/bf16 activations x [N, K] and an int8 weight W [M, K] with one scale
per output channel (or per group of G input channels, GGUF Q8_0), as in perfxllm.quant.formats.

`prepack` keeps qweight int8 [M, K] and stores the scales as float16 [M] (per channel) or [K // G, M]
(per group, transposed so a tile's scales are one contiguous load). One tensor-core kernel: int8 values
are exact in fp16/bf16, so the dot runs on them and the scale is applied after it (per group: after each
group's partial dot). Block shapes are picked by N bucket (16-wide for N <= 16) and tuned on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from perfxllm.kernels._common import HALF_DTYPES, DiskTuner, check_tensor, interpreting, num_sms
from perfxllm.kernels.pdl import pdl_launch_args, wait_for_inputs
from perfxllm.quant.formats import Int8Weight, int8_format_name


@dataclass
class W8Packed:
    qweight: torch.Tensor  # int8 [M, K]
    scales: torch.Tensor  # float16 [M] or [K // G, M]
    group_size: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def format_name(self) -> str:
        return int8_format_name(self.group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return w8a16_matmul(x, self)


def prepack(w: Int8Weight) -> W8Packed:
    """Repack a spec-format Int8Weight into the kernel layout."""
    g = w.group_size
    if g is None:
        return W8Packed(w.qweight.contiguous(), w.scales.reshape(-1).half().contiguous(), None)
    if g % 16 or w.shape[1] % g:
        raise ValueError(f"group size {g} with K={w.shape[1]}: need a multiple of 16 dividing K")
    return W8Packed(w.qweight.contiguous(), w.scales.t().half().contiguous(), g)


@triton.jit(do_not_specialize=["N"])
def _w8a16_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    out_ptr,
    N,
    M,
    K,
    stride_xn,
    stride_on,
    G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    wait_for_inputs(PDL)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = k0 + offs_k < K
        x = tl.load(
            x_ptr + offs_n[:, None] * stride_xn + k0 + offs_k[None, :],
            mask=mask_n[:, None] & mask_k[None, :],
            other=0,
        )
        q = tl.load(
            qw_ptr + offs_m[None, :] * K + k0 + offs_k[:, None],
            mask=mask_k[:, None] & mask_m[None, :],
            other=0,
        ).to(dtype)
        if G == 0:
            acc = tl.dot(x, q, acc)
        else:
            s = tl.load(s_ptr + (k0 // G) * M + offs_m, mask=mask_m, other=0).to(tl.float32)
            acc += tl.dot(x, q) * s[None, :]
    if G == 0:
        acc *= tl.load(s_ptr + offs_m, mask=mask_m, other=0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_n[:, None] * stride_on + offs_m[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


def _configs(n: int, g: int | None) -> list[dict]:
    bn = 16 if n <= 16 else 64
    if interpreting():
        cfgs = [dict(BLOCK_N=16, BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=1)]
    elif n <= 16:
        cfgs = [
            dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=4, num_stages=st)
            for bm in (32, 64)
            for bk in (64, 128, 256)
            for st in (3, 5)
        ]
    else:
        cfgs = [
            dict(BLOCK_N=bnn, BLOCK_M=bm, BLOCK_K=bk, num_warps=8, num_stages=3)
            for bnn, bm, bk in [(64, 128, 64), (128, 128, 64), (128, 256, 64), (128, 128, 128)]
        ]
    return [c for c in cfgs if g is None or g % c["BLOCK_K"] == 0] or [{**cfgs[0], "BLOCK_K": g}]


_tuner = DiskTuner("w8a16_matmul", __file__)


def w8a16_matmul(x: torch.Tensor, w: W8Packed, out: torch.Tensor | None = None) -> torch.Tensor:
    """x float16/bfloat16 [N, K] (or [..., K]), w from prepack -> x @ W.T, [N, M] (or [..., M]) in x's dtype.

    out: optional contiguous destination of that shape and dtype."""
    check_tensor("x", x, dtypes=HALF_DTYPES)
    if not isinstance(w, W8Packed):
        raise ValueError(f"w must be a W8Packed from w8a16_matmul.prepack, got {type(w).__name__}")
    m, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features but the weight has K={k}")
    check_tensor("w.qweight", w.qweight, dtypes=(torch.int8,), device=x.device, contiguous=True)
    check_tensor("w.scales", w.scales, device=x.device, contiguous=True)
    lead = x.shape[:-1]
    if out is None:
        out = x.new_empty(*lead, m)
    check_tensor("out", out, dtypes=(x.dtype,), shape=(*lead, m), device=x.device, contiguous=True)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    if n == 0:
        return out
    o2 = out.view(n, m)

    def launch(cfg: dict) -> None:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
        _w8a16_kernel[grid](
            x2,
            w.qweight,
            w.scales,
            o2,
            n,
            m,
            k,
            x2.stride(0),
            o2.stride(0),
            G=w.group_size or 0,
            **pdl_launch_args(x.device),
            **cfg,
        )

    bucket = n if n <= 16 else min(triton.next_power_of_2(n), 4096)
    key = f"{bucket}:{m}:{k}:{w.group_size}:{x.dtype}:{num_sms(x.device)}"
    launch(_tuner.pick(key, lambda: _configs(n, w.group_size), launch))
    return out


def w8a16_matmul_ref(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """The same product in float32 from the spec format: x [..., K] -> [..., M] float32."""
    return x.float() @ w.dequantize(torch.float32).t()
