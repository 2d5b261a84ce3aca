"""Prefill (and chunked prefill) attention with RoPE on the paged KV cache, in two launches:

1. rope_cache_write (perfxllm.kernels.rope_cache_write): rotates q and k, writes rotated k and v into the
   cache at slot_mapping;
2. a causal grouped-query flash-attention kernel: each new query attends, through block_tables, to its
   sequence's cached tokens and causally to the new ones (which step 1 has just put in the cache).

Shapes and dtypes:
    q [T, Hq, D], k/v [T, Hkv, D]: float16/bfloat16, sequences packed back to back; D a power of two >= 16
    cu_seqlens int32 [B+1]: new tokens of sequence b are rows cu_seqlens[b]:cu_seqlens[b+1]
    cached_lens int32 [B]: tokens of sequence b already in the cache before this chunk
    tiles int32 [n, 2]: (sequence, first new token) of each tile of BLOCK_Q queries to compute
        (prefill_tiles makes it; a sequence of -1 is an empty slot, so that a CUDA graph can keep one grid
        for any batch; rows of sequences without tiles are left alone)
    positions int64 [T] (normally cached_lens[b] + i), slot_mapping int64 [T] (-1: not written)
    block_tables int32 [B, max_blocks], k_cache/v_cache [num_blocks, block_size, Hkv, D]
    cos_sin_cache float32 [max_pos, D]
    out [T, Hq, D] in q's dtype. Softmax in float32, scale 1/sqrt(D) unless given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from perfxllm.kernels._common import check_tensor, interpreting
from perfxllm.kernels.pdl import pdl_launch_args, wait_for_inputs
from perfxllm.kernels.rope_cache_write import rope_cache_write

LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_attention_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    out_ptr,
    cu_ptr,
    cached_ptr,
    bt_ptr,
    tiles_ptr,
    stride_bt,
    scale_log2,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    wait_for_inputs(PDL)
    b = tl.load(tiles_ptr + 2 * tile)
    if b >= 0:
        q0 = tl.load(tiles_ptr + 2 * tile + 1)
        kvh = h // (HQ // HKV)
        start = tl.load(cu_ptr + b)
        qlen = tl.load(cu_ptr + b + 1) - start
        cached = tl.load(cached_ptr + b)
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        mask_q = offs_q < qlen
        offs_d = tl.arange(0, D)
        rows = (start + offs_q).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * (HQ * D) + h * D + offs_d[None, :], mask=mask_q[:, None], other=0)
        q_pos = cached + offs_q
        end = cached + tl.minimum(qlen, q0 + BLOCK_Q)

        m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q, D], dtype=tl.float32)
        for n0 in range(0, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            blk = tl.load(bt_ptr + b.to(tl.int64) * stride_bt + offs_n // BS, mask=mask_n, other=0)
            slot = blk.to(tl.int64) * BS + offs_n % BS
            kv_off = slot[:, None] * (HKV * D) + kvh * D + offs_d[None, :]
            k = tl.load(kc_ptr + kv_off, mask=mask_n[:, None], other=0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            s = tl.where((offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            v = tl.load(vc_ptr + kv_off, mask=mask_n[:, None], other=0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + rows[:, None] * (HQ * D) + h * D + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_q[:, None],
        )


@dataclass(frozen=True)
class PrefillConfig:
    block_q: int  # queries a program takes: the tile of prefill_tiles
    block_n: int  # keys a loop iteration takes
    num_warps: int
    num_stages: int


def prefill_config() -> PrefillConfig:
    """From scripts/tune_attention.py on an H200 (tune-attention-h200.json): two stages rather than three
    gave 322 against 325 us for 16,384 tokens of ~250-token prompts and 518 against 529 us for one of 4,096
    (32-key tiles: 294 and 538 us; 128-query tiles: 336 and 509)."""
    return PrefillConfig(16, 16, 4, 1) if interpreting() else PrefillConfig(64, 64, 4, 2)


def prefill_tiles(
    query_lens: list[int], first: int = 0, capacity: int | None = None, block_q: int | None = None
) -> list[int]:
    """The tiles of sequences first.. as a flat list (sequence, first new token, ...), padded with empty
    slots (-1, 0) up to `capacity` tiles. Sequences before `first` get none (the decode kernel has them).
    block_q: the queries of a tile, prefill_config()'s by default."""
    bq = block_q or prefill_config().block_q
    tiles = [x for b in range(first, len(query_lens)) for q0 in range(0, query_lens[b], bq) for x in (b, q0)]
    if capacity is not None:
        if len(tiles) > 2 * capacity:
            raise ValueError(f"{len(tiles) // 2} query tiles do not fit in {capacity}")
        tiles += [-1, 0] * (capacity - len(tiles) // 2)
    return tiles


def check_heads(hq: int, hkv: int, d: int) -> None:
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")


def prefill_attention(
    q_rot: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cached_lens: torch.Tensor,
    block_tables: torch.Tensor,
    tiles: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """The attention launch alone, on rotated q [T, Hq, D] with this chunk's K/V already in the cache.
    out: an optional contiguous destination shaped and typed like q (rows no tile covers are left alone).
    config: the launch's tiles and pipeline, prefill_config() by default; tiles must be made with its
    block_q."""
    check_tensor("q", q_rot, ndim=3, contiguous=True)
    t, hq, d = q_rot.shape
    check_tensor("k_cache", k_cache, dtypes=(q_rot.dtype,), ndim=4, device=q_rot.device, contiguous=True)
    check_tensor("v_cache", v_cache, dtypes=(q_rot.dtype,), shape=tuple(k_cache.shape), device=q_rot.device)
    _, block_size, hkv, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"k_cache head_dim {dk} != q head_dim {d}")
    check_heads(hq, hkv, d)
    check_tensor(
        "cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1, device=q_rot.device, contiguous=True
    )
    batch = cu_seqlens.shape[0] - 1
    check_tensor("cached_lens", cached_lens, dtypes=(torch.int32,), shape=(batch,), device=q_rot.device)
    check_tensor(
        "block_tables", block_tables, dtypes=(torch.int32,), shape=(batch, None), device=q_rot.device
    )
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must have unit stride in its last dimension")
    check_tensor("tiles", tiles, dtypes=(torch.int32,), shape=(None, 2), device=q_rot.device, contiguous=True)
    if out is None:
        out = torch.empty_like(q_rot)
    check_tensor("out", out, dtypes=(q_rot.dtype,), shape=(t, hq, d), device=q_rot.device, contiguous=True)
    if t == 0 or tiles.shape[0] == 0:
        return out
    config = config or prefill_config()
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    _prefill_attention_kernel[(tiles.shape[0], hq)](
        q_rot,
        k_cache,
        v_cache,
        out,
        cu_seqlens,
        cached_lens.contiguous(),
        block_tables,
        tiles,
        block_tables.stride(0),
        scale * LOG2E,
        HQ=hq,
        HKV=hkv,
        D=d,
        BS=block_size,
        BLOCK_Q=config.block_q,
        BLOCK_N=config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_launch_args(q_rot.device),
    )
    return out


def rope_attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cached_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """See the module docstring: rotates, writes the cache, returns out [T, Hq, D]. Reads the sequence
    lengths back from cu_seqlens to make the tiles (a device-to-host sync; the engine has them on the host)."""
    q_rot = rope_cache_write(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    tiles = torch.tensor(prefill_tiles(lens), dtype=torch.int32, device=q.device).view(-1, 2)
    return prefill_attention(q_rot, k_cache, v_cache, cu_seqlens, cached_lens, block_tables, tiles, scale)


def rope_attention_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache_before: torch.Tensor,
    v_cache_before: torch.Tensor,
    cu_seqlens: torch.Tensor,
    cached_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """float32 reference, sequence by sequence with explicit softmax: cached K/V read from the cache as it
    was before this chunk, new K/V rotated here. Returns out [T, Hq, D] float32."""
    t, hq, d = q.shape
    half, block_size, hkv = d // 2, k_cache_before.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    cos, sin = cos_sin_cache[positions].unsqueeze(1).split(half, dim=-1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().split(half, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    qr, kr = rot(q), rot(k)
    out = torch.empty(t, hq, d, device=q.device)
    for b in range(cu_seqlens.shape[0] - 1):
        s0, s1, cached = int(cu_seqlens[b]), int(cu_seqlens[b + 1]), int(cached_lens[b])
        pos = torch.arange(cached, device=q.device)
        slots = block_tables[b, pos // block_size].long() * block_size + pos % block_size
        keys = torch.cat([k_cache_before.view(-1, hkv, d)[slots].float(), kr[s0:s1]])
        vals = torch.cat([v_cache_before.view(-1, hkv, d)[slots].float(), v[s0:s1].float()])
        keys = keys.repeat_interleave(hq // hkv, dim=1)
        vals = vals.repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qr[s0:s1], keys) * scale
        n = s1 - s0
        causal = (
            torch.arange(cached + n, device=q.device)[None, :]
            <= (cached + torch.arange(n, device=q.device))[:, None]
        )
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out[s0:s1] = torch.einsum("hqk,khd->qhd", probs, vals)
    return out
