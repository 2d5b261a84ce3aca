"""RoPE + paged KV-cache write, shared by prefill and decode (the first of their two launches).

rope_cache_write(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping) -> q_rot
    q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]: float16/bfloat16, unit stride in D (views of a fused
        qkv output are fine)
    positions int64 [T]; cos_sin_cache float32 [max_pos, D] = cat(cos, sin) over D/2 columns each
    k_cache, v_cache [num_blocks, block_size, Hkv, D] contiguous, q's dtype
    slot_mapping int64 [T]: slot = block * block_size + offset, -1 = do not write
Rotates q and k in HF's rotate_half (neox) convention, pairs (i, i + D/2), in float32; writes rotated k
and v into the cache at each token's slot and returns rotated q as a new contiguous [T, Hq, D] tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from perfxllm.kernels._common import HALF_DTYPES, check_last_dim_contiguous, check_tensor
from perfxllm.kernels.pdl import pdl_launch_args, wait_for_inputs


@triton.jit
def _rotate_heads(
    src, dst, stride_h, cos, sin, num_heads, half, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < half)
    ptrs = offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(src + ptrs, mask=mask, other=0).to(tl.float32)
    x2 = tl.load(src + ptrs + half, mask=mask, other=0).to(tl.float32)
    dst_ptrs = offs_h[:, None] * (2 * half) + offs_d[None, :]
    dtype = dst.dtype.element_ty
    tl.store(dst + dst_ptrs, (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype), mask=mask)
    tl.store(dst + dst_ptrs + half, (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype), mask=mask)


@triton.jit
def _rope_cache_write_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cs_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    qo_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    HQ,
    HKV,
    HALF,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    wait_for_inputs(PDL)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cs_ptr + pos * (2 * HALF) + offs_d, mask=offs_d < HALF, other=0)
    sin = tl.load(cs_ptr + pos * (2 * HALF) + HALF + offs_d, mask=offs_d < HALF, other=0)
    _rotate_heads(
        q_ptr + t * stride_qt, qo_ptr + t * HQ * 2 * HALF, stride_qh, cos, sin, HQ, HALF, BLOCK_HQ, BLOCK_D
    )
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        row = slot * HKV * 2 * HALF
        _rotate_heads(k_ptr + t * stride_kt, kc_ptr + row, stride_kh, cos, sin, HKV, HALF, BLOCK_HKV, BLOCK_D)
        offs_h = tl.arange(0, BLOCK_HKV)
        offs_full = tl.arange(0, 2 * BLOCK_D)
        mask = (offs_h[:, None] < HKV) & (offs_full[None, :] < 2 * HALF)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_full[None, :], mask=mask)
        tl.store(vc_ptr + row + offs_h[:, None] * 2 * HALF + offs_full[None, :], v, mask=mask)


def check_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> None:
    check_tensor("k_cache", k_cache, dtypes=(dtype,), ndim=4, device=device, contiguous=True)
    check_tensor(
        "v_cache", v_cache, dtypes=(dtype,), shape=tuple(k_cache.shape), device=device, contiguous=True
    )


def rope_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """See the module docstring."""
    check_tensor("q", q, dtypes=HALF_DTYPES, ndim=3)
    t, hq, d = q.shape
    if d % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {d}")
    check_tensor("k", k, dtypes=(q.dtype,), shape=(t, None, d), device=q.device)
    hkv = k.shape[1]
    check_tensor("v", v, dtypes=(q.dtype,), shape=(t, hkv, d), device=q.device)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, x)
    check_tensor("positions", positions, dtypes=(torch.int64,), shape=(t,), device=q.device)
    check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(t,), device=q.device)
    check_tensor(
        "cos_sin_cache",
        cos_sin_cache,
        dtypes=(torch.float32,),
        shape=(None, d),
        device=q.device,
        contiguous=True,
    )
    check_cache(k_cache, v_cache, q.dtype, q.device)
    if k_cache.shape[2:] != (hkv, d):
        raise ValueError(
            f"k_cache holds [*, *, {k_cache.shape[2]}, {k_cache.shape[3]}] heads, k has [{hkv}, {d}]"
        )
    q_rot = torch.empty(t, hq, d, device=q.device, dtype=q.dtype)
    if t:
        _rope_cache_write_kernel[(t,)](
            q,
            k,
            v,
            positions,
            cos_sin_cache,
            k_cache,
            v_cache,
            slot_mapping,
            q_rot,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            hq,
            hkv,
            d // 2,
            BLOCK_HQ=triton.next_power_of_2(hq),
            BLOCK_HKV=triton.next_power_of_2(hkv),
            BLOCK_D=triton.next_power_of_2(d // 2),
            num_warps=4,
            **pdl_launch_args(q.device),
        )
    return q_rot


def rope_cache_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """Torch reference: writes the caches in place the same way and returns rotated q (float32)."""
    half = q.shape[-1] // 2
    cos, sin = cos_sin_cache[positions].unsqueeze(1).split(half, dim=-1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().split(half, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k.shape[1:])[slots] = rot(k)[keep].to(k_cache.dtype)
    v_cache.view(-1, *v.shape[1:])[slots] = v[keep].to(v_cache.dtype)
    return rot(q)
