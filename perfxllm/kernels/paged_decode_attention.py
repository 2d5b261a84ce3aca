"""Decode attention over the paged KV cache (flash-decoding): one new token per sequence, in one launch.

q [B, Hq, D] float16/bfloat16, ALREADY ROTATED (run perfxllm.kernels.rope_cache_write first: it rotates q,
and writes this step's rotated k and v into the cache). k_cache/v_cache [num_blocks, block_size, Hkv, D];
block_tables int32 [B, max_blocks]; context_lens int32 [B] (this step's token included; 0: a row to leave
alone);
max_context_len: max(context_lens), a host int (an upper bound under a CUDA graph). Returns out [B, Hq, D] in
q's dtype.

Each sequence's context is cut into up to `partitions` parts of whole key tiles, sized from its own length on
the GPU (so a graph captured for the longest context splits a short one as finely); one program per
(sequence, kv head, part) handles all the query heads of its kv head with one 16-row tensor-core dot per key
tile. A context of one part is written out at once; otherwise each part writes its partial output and
log-sum-exp, and the last part to finish (an arrival counter per sequence and kv head, left at zero) merges
them. Softmax in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from perfxllm.kernels._common import check_tensor, interpreting, num_sms
from perfxllm.kernels.pdl import pdl_launch_args, prefetch_l2_each, wait_for_inputs
from perfxllm.kernels.rope_attention_prefill import LOG2E, check_heads

MERGE_ROWS = 128  # (query head, part) pairs one program merges: the partial outputs it holds at once
ARRIVAL_COUNTERS = 2**16  # sequences x kv heads of one launch at most
_arrivals: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _merge_parts(
    o_ptr,
    lse_ptr,
    out_ptr,
    first_row,
    used,
    num_parts,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out of query heads first_row.. (GROUP of them) from their `used` parts' outputs and log-sum-exps."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, D)
    mask = (offs_g[:, None] < GROUP) & (offs_p[None, :] < used)
    rows = (first_row + offs_g)[:, None].to(tl.int64) * num_parts + offs_p[None, :]  # [G, P]
    # .cg: from L2, where the other programs' writes are (this program's L1 has never held these lines)
    lse = tl.load(lse_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
    w = tl.exp2(lse - tl.max(lse, axis=1)[:, None])
    o = tl.load(
        o_ptr + rows[:, :, None] * D + offs_d[None, None, :],
        mask=mask[:, :, None],
        other=0,
        cache_modifier=".cg",
    )
    out = tl.sum(o * w[:, :, None], axis=1) / tl.sum(w, axis=1)[:, None]
    out_rows = (first_row + offs_g).to(tl.int64)
    tl.store(
        out_ptr + out_rows[:, None] * D + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=offs_g[:, None] < GROUP,
    )


@triton.jit
def _prefetch_key_tile(
    kc_ptr,
    vc_ptr,
    bt_ptr,
    b,
    stride_bt,
    kvh,
    start,
    ctx,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The key and value lines of the tile of positions start.. (up to ctx) into L2."""
    LINE: tl.constexpr = 1024 // kc_ptr.dtype.element_ty.primitive_bitwidth  # elements a 128-byte line
    LINES: tl.constexpr = D // LINE if D > LINE else 1
    offs_n = tl.minimum(start + tl.arange(0, BLOCK_N), ctx - 1)
    blk = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + offs_n // BS)
    row = (blk.to(tl.int64) * BS + offs_n % BS) * (HKV * D) + kvh * D
    lines = row[:, None] + tl.arange(0, LINES)[None, :] * LINE
    prefetch_l2_each(kc_ptr + lines)
    prefetch_l2_each(vc_ptr + lines)


@triton.jit(do_not_specialize=["stride_bt", "num_parts"])
def _decode_attention_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    bt_ptr,
    ctx_ptr,
    o_ptr,
    lse_ptr,
    arrival_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_bt,
    num_parts,
    scale_log2,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    # The context lengths, block tables and earlier keys are no kernel's output (the host wrote them before
    # the step; only this step's key is new), so under PDL they are read while the previous kernel runs.
    ctx = tl.load(ctx_ptr + b)
    part_len = tl.cdiv(tl.cdiv(ctx, num_parts), BLOCK_N) * BLOCK_N  # whole key tiles
    start = part * part_len
    if PDL:  # noqa: SIM102 (a constexpr branch of its own: no prefetch is compiled without PDL)
        if start < ctx:
            _prefetch_key_tile(kc_ptr, vc_ptr, bt_ptr, b, stride_bt, kvh, start, ctx, HKV, D, BS, BLOCK_N)
    wait_for_inputs(PDL)
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
        end = tl.minimum(start + part_len, ctx)
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
        head_rows = (b * HQ + heads).to(tl.int64)
        used = tl.cdiv(ctx, part_len)
        if used == 1:
            out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + head_rows[:, None] * D + offs_d[None, :], out, mask=mask_h[:, None])
        else:
            row = head_rows * num_parts + part
            tl.store(o_ptr + row[:, None] * D + offs_d[None, :], acc / l_i[:, None], mask=mask_h[:, None])
            tl.store(lse_ptr + row, m_i + tl.log2(l_i), mask=mask_h)
            tl.debug_barrier()  # every thread's partial results are in before the arrival is counted
            arrived = tl.atomic_add(arrival_ptr + b * HKV + kvh, 1, sem="acq_rel")
            if arrived == used - 1:
                _merge_parts(
                    o_ptr, lse_ptr, out_ptr, b * HQ + kvh * GROUP, used, num_parts, GROUP, D, BLOCK_G, BLOCK_P
                )
                tl.atomic_xchg(arrival_ptr + b * HKV + kvh, 0, sem="relaxed")


def max_partitions(hq: int, hkv: int) -> int:
    """The most parts a context may be cut into: the merge holds (query head, part) pairs of a kv head."""
    return max(1, MERGE_ROWS // triton.next_power_of_2(hq // hkv))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float | None = None,
    partitions: int | None = None,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """See the module docstring. partitions: the most parts a context is cut into (at most
    max_partitions(Hq, Hkv)); by default enough that the grid fills the GPU twice over. out: an optional
    contiguous destination shaped and typed like q. config: the launch's tile and pipeline (scripts/
    tune_attention.py compares them); by default decode_config()'s."""
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
    sms = num_sms(q.device)
    config = config or decode_config(batch * hkv, sms)
    most = max_partitions(hq, hkv)
    if partitions is None:
        partitions = min(
            most, triton.cdiv(2 * sms, batch * hkv), triton.cdiv(max_context_len, config.block_n)
        )
    if not 1 <= partitions <= most:
        raise ValueError(
            f"partitions must be between 1 and {most} for {hq} query heads on {hkv}, got {partitions}"
        )
    if batch * hkv > ARRIVAL_COUNTERS:
        raise ValueError(f"{batch} sequences x {hkv} kv heads exceed the {ARRIVAL_COUNTERS} arrival counters")
    if q.device not in _arrivals:
        _arrivals[q.device] = torch.zeros(ARRIVAL_COUNTERS, dtype=torch.int32, device=q.device)
    o_part = torch.empty(batch, hq, partitions, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, hq, partitions, device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    _decode_attention_kernel[(batch, hkv, partitions)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        o_part,
        lse,
        _arrivals[q.device],
        out,
        q.stride(0),
        q.stride(1),
        block_tables.stride(0),
        partitions,
        scale * LOG2E,
        HQ=hq,
        HKV=hkv,
        D=d,
        BS=block_size,
        BLOCK_H=max(16, triton.next_power_of_2(hq // hkv)),
        BLOCK_N=config.block_n,
        BLOCK_G=triton.next_power_of_2(hq // hkv),
        BLOCK_P=triton.next_power_of_2(partitions),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch_args(q.device),
    )
    return out


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # keys a loop iteration takes
    num_warps: int
    num_stages: int


def decode_config(programs: int, sms: int) -> DecodeConfig:
    """The launch for `programs` (sequence, kv head) pairs, from scripts/tune_attention.py on an H200
    (benchmarks/results/tune-attention-h200.json): where contexts are cut into parts (fewer pairs than
    twice the SMs) a program has a few key tiles, and pipelining them only delays the first (batch 1 at
    4,096 tokens: 24.1 us against 29.1); long single parts take 128 keys a tile where the grid is large
    (Llama-3-8B shape, 256 sequences: 95.7 against 105.8 us) and 64 where it is not (Llama-2-7B shape,
    32 sequences: 75.3 against 78.4 us)."""
    if interpreting():
        return DecodeConfig(16, 4, 1)
    if programs < 2 * sms:
        return DecodeConfig(128, 4, 1)
    return DecodeConfig(128, 4, 3) if programs >= 2048 else DecodeConfig(64, 4, 3)


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
