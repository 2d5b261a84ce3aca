"""Attention over the paged KV cache.

The KV cache of one layer is two tensors [num_blocks, block_size, num_kv_heads, head_dim]. A step's tokens
from all its sequences are packed back to back ([T, ...]); `AttentionMetadata` says where each sequence's
tokens start, where their K/V go in the cache (slot = block * block_size + offset) and which blocks hold each
sequence's context. `attention` is the one call the model makes: on the GPU in half precision it runs the
Triton kernels (RoPE + cache write, then prefill flash attention or flash-decoding); elsewhere the torch
path here, which is also their reference.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from perfxllm.kernels import decode_ops_cpu, runs_on_kernels
from perfxllm.kernels._common import to_device
from perfxllm.layers.rotary import apply_rope


def leading_decodes(query_lens: list[int]) -> int:
    """How many sequences at the front of a step have one new token each."""
    return next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))


@dataclass
class PrefillLayout:
    """Where a step's prompt chunks are, for the prefill kernel (see perfxllm.kernels.rope_attention_prefill):
    rows cu_seqlens[b]:cu_seqlens[b+1] of the step are sequence b's new tokens, cached_lens[b] of its tokens
    were in the cache before them, and tiles lists (sequence, first new token) of each query tile to run."""

    cu_seqlens: torch.Tensor  # int32 [B+1]
    cached_lens: torch.Tensor  # int32 [B]
    tiles: torch.Tensor  # int32 [n, 2]

    @staticmethod
    def of(query_lens: list[int], context_lens: torch.Tensor, first: int) -> PrefillLayout:
        """The layout of sequences first.. of an eager step, in one copy to the device, without waiting
        for the GPU (building a tensor on the device from a list would)."""
        from perfxllm.kernels.rope_attention_prefill import prefill_tiles

        cu = [0, *itertools.accumulate(query_lens)]
        both = to_device(cu + prefill_tiles(query_lens, first), context_lens.device, torch.int32)
        cu_t = both[: len(cu)]
        return PrefillLayout(cu_t, context_lens - (cu_t[1:] - cu_t[:-1]), both[len(cu) :].view(-1, 2))


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens of each sequence in this step
    context_lens: torch.Tensor  # int32 [B]: tokens in the cache after this step's writes
    slot_mapping: torch.Tensor  # int64 [T]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    max_context_len: int  # a host int that sizes kernel grids: under a CUDA graph, an upper bound
    # On the GPU the first decode_rows rows take flash-decoding (by default the leading sequences with one
    # new token each: the model runner puts them first) and the prompt chunks prefill attention. A CUDA graph
    # of mixed steps sets both for its largest batch: rows with context 0 and empty tiles are skipped.
    decode_rows: int | None = None
    prefill: PrefillLayout | None = None
    # the most parts flash-decoding cuts a context into (None: enough for the batch to fill the GPU)
    decode_partitions: int | None = None
    _sliced: dict[tuple[int, int], AttentionMetadata] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.decode_rows is None:
            self.decode_rows = leading_decodes(self.query_lens)

    def sequences(self, start: int, stop: int) -> AttentionMetadata:
        """The metadata of sequences start..stop alone, for the step's rows of their tokens (made once a step,
        not once a layer)."""
        if (start, stop) not in self._sliced:
            first, last = sum(self.query_lens[:start]), sum(self.query_lens[:stop])
            self._sliced[start, stop] = AttentionMetadata(
                self.query_lens[start:stop],
                self.context_lens[start:stop],
                self.slot_mapping[first:last],
                self.block_tables[start:stop],
                self.max_context_len,
            )
        return self._sliced[start, stop]

    def prefill_layout(self) -> PrefillLayout | None:
        """The prompt chunks' layout, made on first use (once a step, not once a layer); None: none."""
        if self.prefill is None and self.decode_rows < len(self.query_lens):
            self.prefill = PrefillLayout.of(self.query_lens, self.context_lens, self.decode_rows)
        return self.prefill


def block_table_tensor(
    block_tables: list[list[int]], device: torch.device = torch.device("cpu")
) -> torch.Tensor:
    """int32 [B, longest] on device: each sequence's blocks, padded with block 0 (never read: context_lens
    bounds reads)."""
    table = np.zeros((len(block_tables), max(len(t) for t in block_tables)), dtype=np.int32)
    for row, blocks in zip(table, block_tables):  # row by row: 4x faster than a tensor from nested lists
        row[: len(blocks)] = blocks
    return to_device(torch.from_numpy(table), device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Unrotated q [T, Hq, D], k/v [T, Hkv, D] -> out [T, Hq, D]: rotates q and k, writes k/v into the
    cache, attends."""
    if decode_ops_cpu.available(q) and k_cache.dtype == q.dtype and decode_ops_cpu.qkv_rows(q, k, v):
        decode_ops_cpu.rope_cache_write(q, k, positions, cos_sin, meta.slot_mapping, k_cache, v_cache)
        rows, batch = meta.decode_rows, len(meta.query_lens)
        if rows == 0:
            return paged_attention_ref(q, k_cache, v_cache, meta, scale)
        decoded = decode_ops_cpu.decode_attention(
            q[:rows], k_cache, v_cache, meta.block_tables[:rows], meta.context_lens[:rows], scale
        )
        if rows == batch:
            return decoded
        prompts = paged_attention_ref(q[rows:], k_cache, v_cache, meta.sequences(rows, batch), scale)
        return torch.cat([decoded, prompts])
    if not runs_on_kernels(q):
        q, k = apply_rope(q, positions, cos_sin), apply_rope(k, positions, cos_sin)
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_ref(q, k_cache, v_cache, meta, scale)
    from perfxllm.kernels.rope_cache_write import rope_cache_write

    q_rot = rope_cache_write(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping)
    from perfxllm.kernels.paged_decode_attention import paged_decode_attention
    from perfxllm.kernels.rope_attention_prefill import prefill_attention

    rows, out = meta.decode_rows, torch.empty_like(q_rot)
    if rows:
        paged_decode_attention(
            q_rot[:rows],
            k_cache,
            v_cache,
            meta.block_tables[:rows],
            meta.context_lens[:rows],
            meta.max_context_len,
            scale,
            meta.decode_partitions,
            out=out[:rows],
        )
    prefill = meta.prefill_layout()
    if prefill is not None:
        prefill_attention(
            q_rot,
            k_cache,
            v_cache,
            prefill.cu_seqlens,
            prefill.cached_lens,
            meta.block_tables,
            prefill.tiles,
            scale,
            out=out,
        )
    return out


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """k, v [T, Hkv, D] into the caches at slots [T], every slot a real one: padding (slot -1) only reaches
    the kernels (skipping it here would need the device's answer, a wait inside the step)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def paged_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D]; each sequence's queries are its last query_len positions, causal."""
    batch, rows = len(meta.query_lens), meta.decode_rows
    # Decodes apart from prompt chunks: padded together, each decode row would take the longest chunk's length.
    if 0 < rows < batch:
        return torch.cat(
            [
                paged_attention_ref(q[:rows], k_cache, v_cache, meta.sequences(0, rows), scale),
                paged_attention_ref(q[rows:], k_cache, v_cache, meta.sequences(rows, batch), scale),
            ]
        )
    block_size = k_cache.shape[1]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    max_q, max_ctx = max(meta.query_lens), meta.max_context_len
    device = q.device

    # Gather each sequence's context K/V through its block table: [B, max_ctx, Hkv, D].
    pos = torch.arange(max_ctx, device=device)
    blocks = meta.block_tables[:, : (max_ctx + block_size - 1) // block_size].long()
    slots = (blocks.repeat_interleave(block_size, dim=1)[:, :max_ctx] * block_size) + (pos % block_size)
    k = k_cache.view(-1, num_kv_heads, head_dim)[slots]
    v = v_cache.view(-1, num_kv_heads, head_dim)[slots]

    if batch == 1:
        qp = q.unsqueeze(0)
    else:
        qp = q.new_zeros(batch, max_q, *q.shape[1:])
        for b, chunk in enumerate(q.split(meta.query_lens)):
            qp[b, : chunk.shape[0]] = chunk

    # Query i of sequence b sits at position context_len - query_len + i and sees keys up to it.
    ctx = meta.context_lens.to(device).long().view(batch, 1, 1)
    qlen = torch.tensor(meta.query_lens, device=device).view(batch, 1, 1)
    q_pos = ctx - qlen + torch.arange(max_q, device=device).view(1, max_q, 1)
    mask = (pos.view(1, 1, max_ctx) <= q_pos) & (pos.view(1, 1, max_ctx) < ctx)

    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2),
        k.transpose(1, 2).to(q.dtype),
        v.transpose(1, 2).to(q.dtype),
        attn_mask=mask.unsqueeze(1),
        scale=scale,
        enable_gqa=True,
    ).transpose(1, 2)
    if batch == 1:
        return out[0]
    return torch.cat([out[b, :n] for b, n in enumerate(meta.query_lens)])
