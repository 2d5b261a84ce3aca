"""The CPU's small decode ops (C kernels) against their torch references in perfxllm.layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perfxllm.kernels import cpu_lib, decode_ops_cpu
from perfxllm.kernels.add_rmsnorm import add_rmsnorm_ref
from perfxllm.layers.attention import AttentionMetadata, paged_attention_ref, write_kv_cache
from perfxllm.layers.rotary import apply_rope, rope_cos_sin_cache

pytestmark = pytest.mark.skipif(cpu_lib.load() is None, reason="no C compiler to build the CPU kernels")


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return not a.isnan().any() and float((a - b).norm() / b.norm()) < tol


def test_add_rmsnorm():
    gen = torch.Generator().manual_seed(0)
    x, res, w = torch.randn(3, 576, generator=gen), torch.randn(3, 576, generator=gen), torch.randn(576)
    out, new_res = decode_ops_cpu.add_rmsnorm(x, res, w, 1e-5)
    ref_out, ref_res = add_rmsnorm_ref(x, res, w, 1e-5)
    assert close(out, ref_out) and torch.equal(new_res, ref_res)
    assert close(decode_ops_cpu.add_rmsnorm(x, None, w, 1e-5), add_rmsnorm_ref(x, None, w, 1e-5))


def test_silu_mul():
    gate_up = torch.randn(4, 2 * 1539, generator=torch.Generator().manual_seed(1)) * 4  # 1539: a scalar tail
    # values at exp's clamped range and past it
    gate_up[0, :6] = torch.tensor([-200.0, -88.0, -30.0, 30.0, 88.0, 200.0])
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate.double()) * up.double()
    got = decode_ops_cpu.silu_mul(gate_up)
    assert close(got.double(), want, 1e-6)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-30)  # elementwise too
    gate_up[1, 5] = float("nan")
    assert decode_ops_cpu.silu_mul(gate_up)[1, 5].isnan()


def paged(hq: int, hkv: int, d: int, lens: list[int], block_size: int, gen: torch.Generator):
    """Sequences of context lens spread over shuffled cache blocks, the caches filled at random."""
    per_seq = [-(-n // block_size) for n in lens]
    order = torch.randperm(sum(per_seq) + 3, generator=gen).int()
    width = max(per_seq)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    start = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = order[start : start + n]
        start += n
    shape = (len(order), block_size, hkv, d)
    k_cache, v_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return tables, k_cache, v_cache


def test_rope_cache_write():
    gen = torch.Generator().manual_seed(2)
    hq, hkv, d, tokens = 9, 3, 64, 5
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen)
    q, k, v = (t.view(tokens, -1, d) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    assert decode_ops_cpu.qkv_rows(q, k, v) and not decode_ops_cpu.qkv_rows(q.clone(), k, v)
    positions = torch.tensor([0, 7, 100, 2047, 3])
    slots = torch.tensor([4, -1, 0, 30, -1])  # -1: padding, written nowhere (not at the last slot)
    cos_sin = rope_cos_sin_cache(d, 2048, 10000.0)
    caches = [torch.zeros(8, 4, hkv, d) for _ in range(4)]
    want_q, want_k = apply_rope(q, positions, cos_sin), apply_rope(k, positions, cos_sin)
    written = slots >= 0
    write_kv_cache(want_k[written], v[written], caches[2], caches[3], slots[written])
    decode_ops_cpu.rope_cache_write(q, k, positions, cos_sin, slots, caches[0], caches[1])
    assert close(q, want_q) and close(k, want_k)
    assert close(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[[4, 0, 30]] = False
    for cache in caches:
        assert cache.view(32, -1)[untouched].eq(0).all() and cache.view(32, -1)[~untouched].ne(0).all()


@pytest.mark.parametrize(
    "hq, hkv, d, lens, spike",
    [
        (9, 3, 64, [1, 17, 200, 64], None),
        # contexts of one whole chunk of scores (256), past it, and over several, with a key in the fourth chunk
        # of sequence 2 whose score (about 500) is far above the first chunks': summed against their maximum,
        # its weight would overflow
        (32, 8, 128, [256, 257, 1000, 3], (2, 900)),
        # one sequence and one kv head: the context is cut into parts (for any thread count), the spike in the
        # last; merged against the first part's maximum, its weight would overflow
        (4, 1, 64, [1000], (0, 990)),
    ],
)
def test_decode_attention(hq, hkv, d, lens, spike):
    gen = torch.Generator().manual_seed(3)
    block_size = 16
    tables, k_cache, v_cache = paged(hq, hkv, d, lens, block_size, gen)
    q = torch.randn(len(lens), hq, d, generator=gen) * 3
    if spike:
        b, p = spike
        slot = int(tables[b, p // block_size]) * block_size + p % block_size
        k_cache.view(-1, hkv, d)[slot] = 5 * q[b, :: hq // hkv]  # the first query head of each kv head
    meta = AttentionMetadata(
        query_lens=[1] * len(lens),
        context_lens=torch.tensor(lens, dtype=torch.int32),
        slot_mapping=torch.zeros(len(lens), dtype=torch.int64),
        block_tables=tables,
        max_context_len=max(lens),
    )
    scale = d**-0.5
    got = decode_ops_cpu.decode_attention(q, k_cache, v_cache, tables, meta.context_lens, scale)
    assert close(got, paged_attention_ref(q, k_cache, v_cache, meta, scale))
