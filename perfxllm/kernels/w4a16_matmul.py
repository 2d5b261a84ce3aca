"""W4A16 matmul: y = x @ W.T for fp16/bf16 activations x [N, K] and an int4 weight W [M, K] with one scale
and zero point (or float minimum) per group of G in {32, 64, 128} input channels (perfxllm.quant.formats).

`prepack` repacks an Int4Weight once at load time:
    qweight uint8   [M, K // 2]   in chunks of 32 input channels: byte j (0..15) of chunk c holds channel
                                  32c + j in its low nibble and 32c + 16 + j in its high nibble, so one
                                  16-byte load per row and chunk feeds two contiguous runs of x
    scales  float16 [K // G, M]   transposed so a tile's scales are one contiguous load
    bias    float16 [K // G, M]   W = q * scale + bias (bias = -zero * scale, or the Q4_1 minimum)

Three tilings, picked by N (tokens):
    N = 1            GEMV: one row tile of W per program over wide K tiles (several groups each, 128-512
                     bytes of every row per load, so enough bytes are in flight to stream the weights);
                     products of raw nibbles and x summed per group, then scaled; split along K with fp32
                     atomics when there are too few row tiles to fill the GPU
    N <= GEMV_MAX_N  memory bound: one row tile of W per program, all N at once in a 16-wide tensor-core
                     dot, optionally split along K
    N >  GEMV_MAX_N  compute bound: [BN, BM] output tiles on the tensor cores

All dequantize in registers and apply the group's scale after the sum over integer nibbles (exact in
fp16/bf16): acc += dot(x, q) * scale + rowsum(x) * bias. Block shapes are tuned per (path, M, K, N bucket) on
the GPU and cached on disk (see _common.DiskTuner).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from perfxllm.kernels._common import HALF_DTYPES, DiskTuner, check_tensor, interpreting, num_sms
from perfxllm.quant.formats import Int4Weight

GEMV_MAX_N = 16
CHUNK = 32  # input channels per 16-byte packed chunk


@dataclass
class W4Packed:
    qweight: torch.Tensor  # uint8 [M, K // 2], chunked nibble order (module docstring)
    scales: torch.Tensor  # float16 [K // G, M]
    bias: torch.Tensor  # float16 [K // G, M]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    @property
    def format_name(self) -> str:
        return f"int4 g{self.group_size}"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return w4a16_matmul(x, self)


def prepack(w: Int4Weight) -> W4Packed:
    """Repack a spec-format Int4Weight (integer zero points or float minima) into the kernel layout."""
    m, k = w.shape
    g = w.group_size
    if g not in (32, 64, 128) or k % g:
        raise ValueError(f"group size {g} with K={k}: need G in (32, 64, 128) dividing K")
    q = w.unpack().view(m, k // CHUNK, 2, CHUNK // 2)
    qweight = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(m, k // 2).contiguous()
    s = w.scales.float()
    z = w.unpacked_zeros().float()
    b = z if w.zeros.is_floating_point() else -z * s
    return W4Packed(qweight, s.t().contiguous().half(), b.t().contiguous().half(), g)


@triton.jit
def _nibbles_to_float(nib, to_dtype: tl.constexpr):
    """int16 values 0..15 -> the same values in to_dtype, through the exponent bits instead of a conversion."""
    if to_dtype == tl.float32:
        return (nib.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    elif to_dtype == tl.float16:
        return (nib | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        return (nib | 0x4300).to(tl.bfloat16, bitcast=True) - 128.0


@triton.jit
def _w4a16_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    b_ptr,
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
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    dtype = x_ptr.dtype.element_ty
    HALF: tl.constexpr = BLOCK_K // 2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    j = tl.arange(0, HALF)
    k_lo = (j // 16) * 32 + j % 16  # input channel of each low nibble within its 32-channel chunk

    num_iters = K // BLOCK_K
    per_split = tl.cdiv(num_iters, SPLIT_K)
    it_start = pid_k * per_split
    it_end = tl.minimum(it_start + per_split, num_iters)

    w_ptrs = qw_ptr + offs_m[:, None] * (K // 2) + j[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for it in range(it_start, it_end):
        k0 = it * BLOCK_K
        qb = tl.load(w_ptrs + k0 // 2, mask=mask_m[:, None], other=0).to(tl.int16)
        grp = k0 // G
        s = tl.load(s_ptr + grp * M + offs_m, mask=mask_m, other=0).to(tl.float32)
        b = tl.load(b_ptr + grp * M + offs_m, mask=mask_m, other=0).to(tl.float32)
        x_ptrs = x_ptr + offs_n[:, None] * stride_xn + k0 + k_lo[None, :]
        x_lo = tl.load(x_ptrs, mask=mask_n[:, None], other=0)
        x_hi = tl.load(x_ptrs + 16, mask=mask_n[:, None], other=0)
        q_lo = _nibbles_to_float(qb & 15, dtype)
        q_hi = _nibbles_to_float(qb >> 4, dtype)
        part = tl.dot(x_lo, tl.trans(q_lo))
        part = tl.dot(x_hi, tl.trans(q_hi), part)
        x_sum = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
        acc += part * s[None, :] + x_sum[:, None] * b[None, :]

    out_ptrs = out_ptr + offs_n[:, None] * stride_on + offs_m[None, :]
    mask = mask_n[:, None] & mask_m[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def _w4_gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    b_ptr,
    out_ptr,
    M,
    K,
    split_k,
    G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    NG: tl.constexpr = BLOCK_K // G  # groups per K tile: bytes [g*G/2, (g+1)*G/2) of a tile are group g

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    j = tl.arange(0, HALF)
    k_lo = (j // 16) * 32 + j % 16
    offs_g = tl.arange(0, NG)

    num_iters = K // BLOCK_K
    per_split = tl.cdiv(num_iters, split_k)
    it_start = pid_k * per_split
    it_end = tl.minimum(it_start + per_split, num_iters)

    w_ptrs = qw_ptr + offs_m[:, None].to(tl.int64) * (K // 2) + j[None, :]
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for it in range(it_start, it_end):
        k0 = it * BLOCK_K
        qb = tl.load(w_ptrs + k0 // 2, mask=mask_m[:, None], other=0).to(tl.int16)
        x_lo = tl.load(x_ptr + k0 + k_lo).to(tl.float32)
        x_hi = tl.load(x_ptr + k0 + k_lo + 16).to(tl.float32)
        prod = _nibbles_to_float(qb & 15, tl.float32) * x_lo[None, :]
        prod += _nibbles_to_float(qb >> 4, tl.float32) * x_hi[None, :]
        per_group = tl.sum(tl.reshape(prod, (BLOCK_M, NG, G // 2)), axis=2)
        x_sum = tl.sum(tl.reshape(x_lo + x_hi, (NG, G // 2)), axis=1)
        sb = (k0 // G + offs_g)[None, :] * M + offs_m[:, None]
        s = tl.load(s_ptr + sb, mask=mask_m[:, None], other=0).to(tl.float32)
        b = tl.load(b_ptr + sb, mask=mask_m[:, None], other=0).to(tl.float32)
        acc += tl.sum(per_group * s + x_sum[None, :] * b, axis=1)

    if ATOMIC:
        tl.atomic_add(out_ptr + offs_m, acc, mask=mask_m, sem="relaxed")
    else:
        tl.store(out_ptr + offs_m, acc.to(out_ptr.dtype.element_ty), mask=mask_m)


def _gemv_configs(m: int, k: int, g: int) -> list[dict]:
    """N = 1: K tiles of whole groups that divide K; row tiles; splits along K that fill the GPU."""
    tiles = [bk for bk in (256, 512, 1024) if bk % g == 0 and k % bk == 0] or [g]
    if interpreting():
        return [dict(BLOCK_M=16, BLOCK_K=tiles[0], SPLIT_K=2, num_warps=4, num_stages=1)]
    return [
        dict(BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=sk, num_warps=w, num_stages=st)
        for bm in (16, 32, 64)
        for bk in tiles[:2]
        for sk in (1, 2, 4, 8)
        for w in (4, 8)
        for st in (2, 4)
        if sk <= k // bk
    ]


def _launch_gemv(x: torch.Tensor, w: W4Packed, cfg: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    m, k = w.shape
    split = cfg["SPLIT_K"]
    dest = out if out is not None else x.new_empty(1, m)
    acc = torch.zeros(1, m, device=x.device, dtype=torch.float32) if split > 1 else dest
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), split)
    _w4_gemv_kernel[grid](
        x,
        w.qweight,
        w.scales,
        w.bias,
        acc,
        m,
        k,
        split,
        G=w.group_size,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        ATOMIC=split > 1,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if split > 1:
        dest.copy_(acc)
    return dest


def _configs(path: str, n: int, g: int) -> list[dict]:
    """Candidate block shapes; BLOCK_K never exceeds the group size (one scale per row and iteration)."""
    if path == "gemv":
        if interpreting():
            return [dict(BLOCK_N=16, BLOCK_M=16, BLOCK_K=min(64, g), SPLIT_K=2, num_warps=4, num_stages=1)]
        shapes = [(bm, bk, sk) for bm in (16, 32, 64) for bk in sorted({min(64, g), g}) for sk in (1, 2, 4)]
        return [
            dict(BLOCK_N=16, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=sk, num_warps=4, num_stages=st)
            for bm, bk, sk in shapes
            for st in (3, 5)
        ]
    if interpreting():
        return [dict(BLOCK_N=16, BLOCK_M=32, BLOCK_K=min(64, g), SPLIT_K=1, num_warps=4, num_stages=1)]
    shapes = {
        (bn, bm, min(bk, g), w, st)
        for bn, bm, bk, w, st in [
            (128, 128, 64, 8, 3),
            (128, 128, 128, 8, 3),
            (64, 128, 128, 4, 4),
            (128, 256, 64, 8, 3),
            (64, 256, 64, 8, 4),
            (256, 128, 64, 8, 3),
            (64, 64, 128, 4, 4),
        ]
    }
    return [
        dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, SPLIT_K=1, num_warps=w, num_stages=st)
        for bn, bm, bk, w, st in sorted(shapes)
    ]


_tuner = DiskTuner("w4a16_matmul")


def _n_bucket(n: int) -> int:
    return n if n <= GEMV_MAX_N else min(triton.next_power_of_2(n), 4096)


def _launch(x: torch.Tensor, w: W4Packed, cfg: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    n, k = x.shape
    m = w.shape[0]
    split = cfg["SPLIT_K"]
    dest = out if out is not None else x.new_empty(n, m)
    acc = torch.zeros(n, m, device=x.device, dtype=torch.float32) if split > 1 else dest
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split)
    _w4a16_kernel[grid](
        x, w.qweight, w.scales, w.bias, acc, n, m, k, x.stride(0), acc.stride(0), G=w.group_size, **cfg
    )
    if split > 1:
        dest.copy_(acc)
    return dest


def w4a16_matmul(
    x: torch.Tensor, w: W4Packed, out: torch.Tensor | None = None, config: dict | None = None
) -> torch.Tensor:
    """x float16/bfloat16 [N, K] (or [..., K]), w from prepack -> x @ W.T, [N, M] (or [..., M]) in x's dtype.

    out: optional contiguous destination of that shape and dtype. config: force one block shape (tests);
    by default it is tuned per shape on the GPU."""
    check_tensor("x", x, dtypes=HALF_DTYPES)
    if not isinstance(w, W4Packed):
        raise ValueError(f"w must be a W4Packed from w4a16_matmul.prepack, got {type(w).__name__}")
    m, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features but the weight has K={k}")
    for name in ("qweight", "scales", "bias"):
        check_tensor(f"w.{name}", getattr(w, name), device=x.device, contiguous=True)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), shape=(*lead, m), device=x.device, contiguous=True)
    if n == 0:
        return x.new_empty(*lead, m) if out is None else out
    path = "gemv1" if n == 1 else "gemv" if n <= GEMV_MAX_N else "gemm"
    launch = _launch_gemv if n == 1 else _launch
    if config is None:
        key = f"{path}:{_n_bucket(n)}:{m}:{k}:{w.group_size}:{x.dtype}:{num_sms(x.device)}"
        configs = _gemv_configs(m, k, w.group_size) if n == 1 else _configs(path, n, w.group_size)
        config = _tuner.pick(key, configs, lambda c: launch(x2, w, c))
    return launch(x2, w, config, None if out is None else out.view(n, m)).view(*lead, m)


def w4a16_matmul_ref(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """The same product in float32 from the spec format: x [..., K] -> [..., M] float32."""
    return x.float() @ w.dequantize(torch.float32).t()
