"""The CPU attention of a mixed step (decodes, then prompt chunks) against each sequence attended alone."""

from __future__ import annotations

import torch

from perfxllm.layers.attention import AttentionMetadata, attention, paged_attention_ref
from perfxllm.layers.rotary import rope_cos_sin_cache

HQ, HKV, D, BLOCK = 4, 2, 64, 16
QUERY_LENS, CONTEXT_LENS = [1, 1, 1, 7, 12], [5, 40, 17, 7, 30]  # the last chunk follows 18 cached tokens


def step(gen: torch.Generator):
    """One step's q, k, v (rows of one qkv buffer, as the model makes them), positions and metadata, over
    shuffled cache blocks filled at random."""
    per_seq = [-(-n // BLOCK) for n in CONTEXT_LENS]
    order = torch.randperm(sum(per_seq), generator=gen).int()
    tables = torch.zeros(len(per_seq), max(per_seq), dtype=torch.int32)
    for b, start in enumerate(torch.tensor([0, *per_seq]).cumsum(0)[:-1].tolist()):
        tables[b, : per_seq[b]] = order[start : start + per_seq[b]]
    positions = torch.cat([torch.arange(c - q, c) for q, c in zip(QUERY_LENS, CONTEXT_LENS)])
    seq = torch.repeat_interleave(torch.arange(len(QUERY_LENS)), torch.tensor(QUERY_LENS))
    slots = tables[seq, positions // BLOCK].long() * BLOCK + positions % BLOCK
    qkv = torch.randn(len(positions), (HQ + 2 * HKV) * D, generator=gen)
    meta = AttentionMetadata(QUERY_LENS, torch.tensor(CONTEXT_LENS, dtype=torch.int32), slots, tables, 40)
    caches = [torch.randn(len(order), BLOCK, HKV, D, generator=gen) for _ in range(2)]
    return qkv, positions, meta, caches


def split(qkv: torch.Tensor):
    return (t.view(len(qkv), -1, D) for t in qkv.split([HQ * D, HKV * D, HKV * D], dim=-1))


def alone(meta: AttentionMetadata, b: int) -> tuple[slice, AttentionMetadata]:
    first = sum(meta.query_lens[:b])
    rows = slice(first, first + meta.query_lens[b])
    ctx = meta.context_lens[b : b + 1]
    return rows, AttentionMetadata(
        meta.query_lens[b : b + 1], ctx, meta.slot_mapping[rows], meta.block_tables[b : b + 1], int(ctx)
    )


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not a.isnan().any() and float((a - b).norm() / b.norm()) < 1e-5


def test_mixed_step_attends_as_each_sequence_alone():
    """`attention` (on the CPU: the C decode kernel for the decodes when it is built) and the torch reference
    give each sequence of a mixed step what it gets alone."""
    gen = torch.Generator().manual_seed(0)
    qkv, positions, meta, caches = step(gen)
    cos_sin, scale = rope_cos_sin_cache(D, 2048, 10000.0), D**-0.5
    k_cache, v_cache = (c.clone() for c in caches)
    mixed = attention(*split(qkv.clone()), positions, cos_sin, k_cache, v_cache, meta, scale)
    q = torch.randn(len(positions), HQ, D, generator=gen)
    reference = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    for b in range(len(QUERY_LENS)):
        rows, meta_b = alone(meta, b)
        k_b, v_b = (c.clone() for c in caches)
        out = attention(*split(qkv[rows].clone()), positions[rows], cos_sin, k_b, v_b, meta_b, scale)
        assert close(mixed[rows], out), b
        assert close(reference[rows], paged_attention_ref(q[rows], k_cache, v_cache, meta_b, scale)), b
