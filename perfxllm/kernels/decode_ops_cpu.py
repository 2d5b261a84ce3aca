"""Launchers of the CPU path's small ops (csrc/decode_ops.c): residual add + RMSNorm, SiLU-and-mul, RoPE with
the KV-cache write, and attention of one query token per sequence over the paged cache. Each takes float32
CPU tensors and replaces a dozen torch ops of its reference in perfxllm.layers (norm, activation, attention),
whose dispatch costs more than their arithmetic at one token. `available(x)` says whether they take x.
"""

from __future__ import annotations

import torch

from perfxllm.kernels import cpu_lib


def available(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and cpu_lib.load() is not None


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    h = x.shape[-1]
    cpu_lib.load().add_rmsnorm_f32(
        x.data_ptr(), None if residual is None else residual.contiguous().data_ptr(), weight.data_ptr(),
        x.numel() // h, h, eps, out.data_ptr(), res_out.data_ptr(),
    )  # fmt: skip
    return out if residual is None else (out, res_out)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate_up = gate_up.contiguous()
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    cpu_lib.load().silu_mul_f32(gate_up.data_ptr(), gate_up.numel() // (2 * inter), inter, out.data_ptr())
    return out


def qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q [T, Hq, D], k, v [T, Hkv, D] are the consecutive parts of contiguous qkv rows (a fused
    projection's output split), which rope_cache_write rotates in place."""
    size = q.element_size()
    width = (q.shape[1] + 2 * k.shape[1]) * q.shape[2]
    rows = q.shape[0] == 1 or q.stride(0) == k.stride(0) == v.stride(0) == width  # one row: any stride
    return (
        rows
        and q.stride()[1:] == (q.shape[2], 1)
        and k.stride()[1:] == v.stride()[1:] == (k.shape[2], 1)
        and k.data_ptr() == q.data_ptr() + q.shape[1] * q.shape[2] * size
        and v.data_ptr() == k.data_ptr() + k.shape[1] * k.shape[2] * size
    )


def rope_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """Rotates q and k in place and writes k and v into the caches; q, k, v as qkv_rows says."""
    cpu_lib.load().rope_cache_write_f32(
        q.data_ptr(), q.shape[0], q.shape[1], k.shape[1], q.shape[2], positions.data_ptr(),
        cos_sin.data_ptr(), slots.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, Hq, D] (row stride free) -> out [B, Hq, D]: one query per sequence, over its cached context."""
    batch, hq, d = q.shape
    out = q.new_empty(batch, hq, d)
    cpu_lib.load().decode_attention_f32(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], context_lens.data_ptr(), batch, hq, k_cache.shape[2], d, k_cache.shape[1],
        scale, out.data_ptr(),
    )  # fmt: skip
    return out
