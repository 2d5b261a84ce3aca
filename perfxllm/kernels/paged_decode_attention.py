"""Decode attention over the paged KV cache (flash-decoding): one new token per sequence.

q [B, Hq, D] float16/bfloat16, ALREADY ROTATED (run perfxllm.kernels.rope_cache_write first: it rotates q,
and writes this step's rotated k and v into the cache). k_cache/v_cache [num_blocks, block_size, Hkv, D];
block_tables int32 [B, max_blocks]; context_lens int32 [B] (this step's token included; 0: a row to leave
alone);
max_context_len: max(context_lens), a host int (sizes the grid). Returns out [B, Hq, D] in q's dtype.

Each sequence's context is cut into partitions of partition_size tokens; one program per (sequence, kv
head, partition) handles all the query heads of its kv head with one 16-row tensor-core dot per key tile
and writes its partial output and log-sum-exp; a second kernel merges the partitions. Softmax in float32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from perfxllm.kernels._common import check_tensor, interpreting, num_sms
from perfxllm.kernels.pdl import pdl_launch_args, wait_for_inputs
from perfxllm.kernels.rope_attention_prefill import LOG2E, check_heads


@triton.jit(do_not_specialize=["stride_bt", "num_parts"])
def _decode_partial_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    bt_ptr,
    ctx_ptr,
    o_ptr,
    lse_ptr,
    stride_qb,
    stride_qh,
    stride_bt,
    num_parts,
    scale_log2,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    PART: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    wait_for_inputs(PDL)
    ctx = tl.load(ctx_ptr + b)
    start = part * PART
    if start < ctx:
        GROUP: tl.constexpr = HQ // HKV
        offs_h = tl.arange(0, BLOCK_H)
        mask_h = offs_h < GROUP
        heads = kvh * GROUP + offs_h
        offs_d = tl.arange(0, D)
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_h[:, None],
            other=0,
        )
        end = tl.minimum(start + PART, ctx)
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            blk = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + offs_n // BS, mask=mask_n, other=0)
            slot = blk.to(tl.int64) * BS + offs_n % BS
            kv_off = slot[:, None] * (HKV * D) + kvh * D + offs_d[None, :]
            k = tl.load(kc_ptr + kv_off, mask=mask_n[:, None], other=0)
            v = tl.load(vc_ptr + kv_off, mask=mask_n[:, None], other=0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        row = (b * HQ + heads).to(tl.int64) * num_parts + part
        tl.store(o_ptr + row[:, None] * D + offs_d[None, :], acc / l_i[:, None], mask=mask_h[:, None])
        tl.store(lse_ptr + row, m_i + tl.log2(l_i), mask=mask_h)


@triton.jit(do_not_specialize=["num_parts"])
def _decode_reduce_kernel(
    o_ptr,
    lse_ptr,
    ctx_ptr,
    out_ptr,
    num_parts,
    HQ: tl.constexpr,
    D: tl.constexpr,
    PART: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    wait_for_inputs(PDL)
    used = tl.cdiv(tl.load(ctx_ptr + b), PART)
    if used > 0:  # an empty context is a row to leave alone (a graph's padding, a prompt chunk's row)
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = offs_p < used
        row = (b * HQ + h).to(tl.int64) * num_parts
        lse = tl.load(lse_ptr + row + offs_p, mask=mask_p, other=float("-inf"))
        w = tl.exp2(lse - tl.max(lse, axis=0))
        offs_d = tl.arange(0, D)
        o = tl.load(o_ptr + (row + offs_p)[:, None] * D + offs_d[None, :], mask=mask_p[:, None], other=0)
        out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + (b * HQ + h).to(tl.int64) * D + offs_d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float | None = None,
    partition_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """See the module docstring. partition_size (a multiple of the key tile, 16 on the interpreter and 64
    on the GPU): tokens per partition; by default sized so the grid fills the GPU. out: an optional
    contiguous destination shaped and typed like q."""
    check_tensor("q", q, dtypes=(torch.float16, torch.bfloat16), ndim=3)
    if q.stride(-1) != 1:
        raise ValueError("q must have unit stride in its last dimension")
    batch, hq, d = q.shape
    check_tensor("k_cache", k_cache, dtypes=(q.dtype,), ndim=4, device=q.device, contiguous=True)
    check_tensor("v_cache", v_cache, dtypes=(q.dtype,), shape=tuple(k_cache.shape), device=q.device)
    _, block_size, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"k_cache head_dim {dk} != q head_dim {d}")
    check_heads(hq, hkv, d)
    check_tensor("block_tables", block_tables, dtypes=(torch.int32,), shape=(batch, None), device=q.device)
    check_tensor(
        "context_lens", context_lens, dtypes=(torch.int32,), shape=(batch,), device=q.device, contiguous=True
    )
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must have unit stride in its last dimension")
    if out is None:
        out = torch.empty_like(q)
    check_tensor("out", out, dtypes=(q.dtype,), shape=tuple(q.shape), device=q.device, contiguous=True)
    if batch == 0 or max_context_len <= 0:
        return out
    block_n = 16 if interpreting() else 64
    if partition_size is None:
        want_parts = triton.cdiv(2 * num_sms(q.device), batch * hkv)
        partition_size = max(block_n, triton.next_power_of_2(triton.cdiv(max_context_len, want_parts)))
    if partition_size % block_n:
        raise ValueError(f"partition_size {partition_size} must be a multiple of {block_n}")
    num_parts = triton.cdiv(max_context_len, partition_size)
    o_part = torch.empty(batch, hq, num_parts, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, hq, num_parts, device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    _decode_partial_kernel[(batch, hkv, num_parts)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        o_part,
        lse,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        num_parts,
        scale * LOG2E,
        HQ=hq,
        HKV=hkv,
        D=d,
        BS=block_size,
        PART=partition_size,
        BLOCK_H=max(16, triton.next_power_of_2(hq // hkv)),
        BLOCK_N=block_n,
        num_warps=4,
        num_stages=1 if interpreting() else 3,
        **pdl_launch_args(q.device),
    )
    _decode_reduce_kernel[(batch, hq)](
        o_part,
        lse,
        context_lens,
        out,
        num_parts,
        HQ=hq,
        D=d,
        PART=partition_size,
        BLOCK_P=triton.next_power_of_2(num_parts),
        num_warps=4,
        **pdl_launch_args(q.device),
    )
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """float32 reference through torch SDPA, sequence by sequence: out [B, Hq, D] float32."""
    batch, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(batch, hq, d, device=q.device)
    for b in range(batch):
        pos = torch.arange(int(context_lens[b]), device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        k = k_cache.view(-1, hkv, d)[slots].float().repeat_interleave(hq // hkv, dim=1)
        v = v_cache.view(-1, hkv, d)[slots].float().repeat_interleave(hq // hkv, dim=1)
        out[b] = torch.nn.functional.scaled_dot_product_attention(
            q[b].float().unsqueeze(1), k.transpose(0, 1), v.transpose(0, 1), scale=scale
        ).squeeze(1)
    return out
