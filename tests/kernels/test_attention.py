"""RoPE + cache write, prefill attention and decode attention on a paged cache with shuffled blocks,
ragged sequences and partially filled blocks, against float32 references."""

from __future__ import annotations

import pytest
import torch

from perfxllm.kernels.paged_decode_attention import (
    DecodeConfig,
    max_partitions,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from perfxllm.kernels.rope_attention_prefill import (
    PrefillConfig,
    prefill_attention,
    prefill_config,
    prefill_tiles,
    rope_attention_prefill,
    rope_attention_prefill_ref,
)
from perfxllm.kernels.rope_cache_write import rope_cache_write, rope_cache_write_ref
from perfxllm.layers.rotary import rope_cos_sin_cache

BLOCK_SIZE = 4
TOL = 3e-3


def make_paged(batch, total_lens, hkv, d, gen, num_blocks=64):
    """Random (non-zero) caches and block tables that hand each sequence a shuffled set of blocks."""
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen).half()
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, hkv, d, generator=gen).half()
    max_blocks = max(-(-n // BLOCK_SIZE) for n in total_lens) + 1
    perm = torch.randperm(num_blocks, generator=gen)
    tables = perm[: batch * max_blocks].view(batch, max_blocks).to(torch.int32)
    return k_cache, v_cache, tables


def slots_of(tables, seq, positions):
    return tables[seq, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE


def test_rope_cache_write(device, rel_err):
    gen = torch.Generator().manual_seed(0)
    t, hq, hkv, d = 6, 4, 2, 32
    k_cache, v_cache, tables = make_paged(1, [t], hkv, d, gen)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).half()
    q, k, v = qkv.view(t, -1, d).split([hq, hkv, hkv], dim=1)  # strided views of a fused projection
    positions = torch.randint(0, 100, (t,), generator=gen)
    slots = slots_of(tables, 0, torch.arange(t))
    slots[2] = -1
    cs = rope_cos_sin_cache(d, 128, 10000.0)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_q = rope_cache_write_ref(q, k, v, positions, cs, ref_k, ref_v, slots)
    kc, vc = k_cache.to(device), v_cache.to(device)
    dev = [x.to(device) for x in (q, k, v, positions, cs)]
    q_rot = rope_cache_write(*dev, kc, vc, slots.to(device))
    assert rel_err(q_rot, ref_q) < TOL
    assert rel_err(kc, ref_k) < TOL
    assert torch.equal(vc.cpu(), ref_v)


@pytest.mark.parametrize(("hq", "hkv", "d"), [(4, 2, 32), (2, 2, 16)])
@pytest.mark.parametrize(("cached", "new"), [([0, 5, 9], [7, 3, 18]), ([0], [20])])
def test_prefill(hq, hkv, d, cached, new, device, rel_err):
    gen = torch.Generator().manual_seed(sum(new) + d)
    batch, t = len(new), sum(new)
    k_cache, v_cache, tables = make_paged(batch, [c + n for c, n in zip(cached, new)], hkv, d, gen)
    q = torch.randn(t, hq, d, generator=gen).half()
    k = torch.randn(t, hkv, d, generator=gen).half()
    v = torch.randn(t, hkv, d, generator=gen).half()
    positions = torch.cat([c + torch.arange(n) for c, n in zip(cached, new)])
    seq_of = torch.repeat_interleave(torch.arange(batch), torch.tensor(new))
    slots = slots_of(tables, seq_of, positions)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    cached_t = torch.tensor(cached, dtype=torch.int32)
    cs = rope_cos_sin_cache(d, 64, 10000.0)
    ref = rope_attention_prefill_ref(q, k, v, positions, cs, k_cache, v_cache, cu, cached_t, tables)
    dev = [x.to(device) for x in (q, k, v, positions, cs, k_cache, v_cache, slots, cu, cached_t, tables)]
    out = rope_attention_prefill(*dev)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize(("hq", "hkv", "d"), [(8, 2, 64), (2, 2, 32)])
@pytest.mark.parametrize("partitions", [None, 1, 3, 16])
def test_decode(hq, hkv, d, partitions, device, rel_err):
    """Contexts cut into one part, a few, and many (one key tile each, 16 keys interpreted and 64 on the
    GPU, for the longest); run twice, so that the arrival counters the first call leaves behind serve the
    second."""
    gen = torch.Generator().manual_seed(hq + d)
    lens = [1, 17, 70, 200]
    k_cache, v_cache, tables = make_paged(len(lens), lens, hkv, d, gen, num_blocks=256)
    ctx = torch.tensor(lens, dtype=torch.int32)
    dev = [x.to(device) for x in (k_cache, v_cache, tables, ctx)]
    for _ in range(2):
        q = torch.randn(len(lens), hq, d, generator=gen).half()
        ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx)
        out = paged_decode_attention(q.to(device), *dev, max(lens), partitions=partitions)
        assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("config", [PrefillConfig(32, 32, 4, 2), PrefillConfig(16, 64, 8, 3)])
def test_prefill_launch_configs(config, device, rel_err):
    """Other tiles than the default's (queries a program, keys an iteration), with tiles made for them."""
    gen = torch.Generator().manual_seed(3)
    hq, hkv, d, cached, new = 4, 2, 32, [0, 5, 9], [40, 3, 18]
    batch, t = len(new), sum(new)
    k_cache, v_cache, tables = make_paged(batch, [c + n for c, n in zip(cached, new)], hkv, d, gen)
    q, k, v = (torch.randn(t, h, d, generator=gen).half() for h in (hq, hkv, hkv))
    positions = torch.cat([c + torch.arange(n) for c, n in zip(cached, new)])
    slots = slots_of(tables, torch.repeat_interleave(torch.arange(batch), torch.tensor(new)), positions)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    cached_t = torch.tensor(cached, dtype=torch.int32)
    cs = rope_cos_sin_cache(d, 64, 10000.0)
    ref = rope_attention_prefill_ref(q, k, v, positions, cs, k_cache, v_cache, cu, cached_t, tables)
    q, k, v, positions, cs, kc, vc, slots, cu, cached_t, tables = (
        x.to(device) for x in (q, k, v, positions, cs, k_cache, v_cache, slots, cu, cached_t, tables)
    )
    q_rot = rope_cache_write(q, k, v, positions, cs, kc, vc, slots)
    tiles = torch.tensor(prefill_tiles(new, block_q=config.block_q), dtype=torch.int32, device=device)
    out = prefill_attention(q_rot, kc, vc, cu, cached_t, tables, tiles.view(-1, 2), config=config)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("config", [DecodeConfig(32, 2, 1), DecodeConfig(128, 4, 3)])
@pytest.mark.parametrize("partitions", [None, 3])
def test_decode_launch_configs(config, partitions, device, rel_err):
    """Other key tiles, warps and stages than the default's: the part lengths follow the tile."""
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, lens = 8, 2, 32, [1, 17, 70, 300]
    k_cache, v_cache, tables = make_paged(len(lens), lens, hkv, d, gen, num_blocks=512)
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), hq, d, generator=gen).half()
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx)
    dev = [x.to(device) for x in (q, k_cache, v_cache, tables, ctx)]
    out = paged_decode_attention(*dev, max(lens), partitions=partitions, config=config)
    assert rel_err(out, ref) < TOL


def test_prefill_tiles():
    bq = prefill_config().block_q
    lens = [1, 1, bq + 3, 2 * bq, 1]
    assert prefill_tiles(lens, first=2) == [2, 0, 2, bq, 3, 0, 3, bq, 4, 0]
    assert prefill_tiles([bq], capacity=3) == [0, 0, -1, 0, -1, 0]
    with pytest.raises(ValueError, match="2 query tiles do not fit in 1"):
        prefill_tiles([bq + 1], capacity=1)


def test_prefill_skips_empty_tiles_and_rows_without_tiles(device, rel_err):
    """A CUDA graph's grid: padded with empty tiles, over rows of which only some are prompt chunks. The
    kernel computes the rows of the tiled sequences and leaves the others as they were."""
    from perfxllm.layers.attention import AttentionMetadata, paged_attention_ref

    gen = torch.Generator().manual_seed(3)
    hq, hkv, d = 4, 2, 32
    cached, new = [6, 0, 9, 0], [1, 21, 1, 5]  # sequences 0 and 2 (rows 0 and 22) get no tiles
    total = [c + n for c, n in zip(cached, new)]
    k_cache, v_cache, tables = make_paged(len(new), total, hkv, d, gen)
    q = torch.randn(sum(new), hq, d, generator=gen).half()
    meta = AttentionMetadata(new, torch.tensor(total, dtype=torch.int32), torch.empty(0), tables, max(total))
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, d**-0.5)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    cached_t = torch.tensor(cached, dtype=torch.int32)
    bq = prefill_config().block_q
    tiles = [x for b in (1, 3) for q0 in range(0, new[b], bq) for x in (b, q0)] + [-1, 0] * 3
    dev = [x.to(device) for x in (q, k_cache, v_cache, cu, cached_t, tables)]
    tiles_t = torch.tensor(tiles, dtype=torch.int32, device=device).view(-1, 2)
    poison = torch.full_like(q, float("nan")).to(device)
    out = prefill_attention(*dev, tiles_t, out=poison).cpu()
    assert out[[0, 22]].isnan().all()
    keep = [i for i in range(len(q)) if i not in (0, 22)]
    assert rel_err(out[keep], ref[keep]) < TOL


def test_decode_leaves_rows_with_empty_context_alone(device, rel_err):
    gen = torch.Generator().manual_seed(8)
    lens = [5, 0, 40, 0]
    k_cache, v_cache, tables = make_paged(len(lens), [max(n, 1) for n in lens], 2, 32, gen, num_blocks=64)
    q = torch.randn(len(lens), 4, 32, generator=gen).half()
    ctx = torch.tensor(lens, dtype=torch.int32)
    dev = [x.to(device) for x in (q, k_cache, v_cache, tables, ctx)]
    out = paged_decode_attention(*dev, max(lens), out=torch.full_like(q, float("nan")).to(device)).cpu()
    assert out[[1, 3]].isnan().all()
    keep = [0, 2]
    assert (
        rel_err(out[keep], paged_decode_attention_ref(q[keep], k_cache, v_cache, tables[keep], ctx[keep]))
        < TOL
    )


def test_errors(device):
    q = torch.randn(2, 4, 32, device=device).half()
    cache = torch.randn(8, BLOCK_SIZE, 2, 32, device=device).half()
    tables = torch.zeros(2, 2, dtype=torch.int32, device=device)
    ctx = torch.ones(2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="context_lens must have dtype int32"):
        paged_decode_attention(q, cache, cache, tables, ctx.long(), 1)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_decode_attention(q[:, :3], cache, cache, tables, ctx, 1)
    with pytest.raises(ValueError, match="v_cache must have shape"):
        paged_decode_attention(q, cache, cache[:4], tables, ctx, 1)
    assert (max_partitions(32, 32), max_partitions(32, 8), max_partitions(28, 4)) == (128, 32, 16)
    with pytest.raises(ValueError, match="partitions must be between 1 and 64 for 4 query heads on 2"):
        paged_decode_attention(q, cache, cache, tables, ctx, 1, partitions=65)
    many = 2**15 + 1  # sequences: with 2 kv heads, more than the arrival counters
    with pytest.raises(ValueError, match="32769 sequences x 2 kv heads exceed the 65536 arrival counters"):
        paged_decode_attention(
            q[:1].expand(many, -1, -1),
            cache,
            cache,
            tables[:1].expand(many, -1),
            ctx[:1].expand(many).contiguous(),
            1,
        )
    with pytest.raises(ValueError, match="slot_mapping must have dtype int64"):
        rope_cache_write(
            q, q[:, :2], q[:, :2], ctx.long(), torch.ones(4, 32, device=device), cache, cache, ctx
        )


def test_mixed_step_dispatch(device, rel_err, monkeypatch):
    """A step of decodes (first) and prompt chunks: `attention` runs flash-decoding on the first and prefill
    attention on the rest, and matches the float32 torch path over the whole step."""
    from perfxllm.layers import attention as attn

    monkeypatch.setattr(attn.decode_ops_cpu, "available", lambda q: False)
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d = 4, 2, 32
    cached, new = [4, 16, 30, 0, 7], [1, 1, 1, 6, 9]
    total = [c + n for c, n in zip(cached, new)]
    k_cache, v_cache, tables = make_paged(len(new), total, hkv, d, gen)
    t = sum(new)
    q = torch.randn(t, hq, d, generator=gen)
    k = torch.randn(t, hkv, d, generator=gen)
    v = torch.randn(t, hkv, d, generator=gen)
    positions = torch.cat([c + torch.arange(n) for c, n in zip(cached, new)])
    seq_of = torch.repeat_interleave(torch.arange(len(new)), torch.tensor(new))
    cs = rope_cos_sin_cache(d, 64, 10000.0)

    def run(dtype, dev):
        meta = attn.AttentionMetadata(
            query_lens=new,
            context_lens=torch.tensor(total, dtype=torch.int32, device=dev),
            slot_mapping=slots_of(tables, seq_of, positions).to(dev),
            block_tables=tables.to(dev),
            max_context_len=max(total),
        )
        kc, vc = k_cache.to(dev, dtype), v_cache.to(dev, dtype)
        qkv = [x.to(dev, dtype) for x in (q, k, v)]
        return attn.attention(*qkv, positions.to(dev), cs.to(dev), kc, vc, meta, d**-0.5), meta

    ref, _ = run(torch.float32, "cpu")
    monkeypatch.setattr(attn, "runs_on_kernels", lambda x: True)
    out, meta = run(torch.float16, device)
    assert meta.decode_rows == 3
    assert rel_err(out, ref) < TOL
