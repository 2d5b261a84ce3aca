"""The packed formats and the round-to-nearest quantizers: packing, error bounds, row operations."""

from __future__ import annotations

import pytest
import torch

from perfxllm.layers.linear import concat_weights, linear, select_columns, select_rows, split_weight
from perfxllm.quant.formats import Int4Weight, Int8Weight, int4_group_size, pack_int4
from perfxllm.quant.rtn import QuantSpec, quantize_int4, quantize_int8


def test_pack_unpack_round_trip():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert packed[0, 0] == q[0, 0] | (q[0, 1] << 4)  # element 2j low nibble, 2j+1 high nibble
    w = Int4Weight(packed, torch.ones(5, 2, dtype=torch.float16), torch.zeros(5, 1, dtype=torch.uint8), 32)
    assert torch.equal(w.unpack(), q)
    assert w.shape == (5, 64)


def test_zero_points_packed_two_per_byte_with_an_odd_group_count():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (6, 576), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 16, (6, 9), generator=g, dtype=torch.uint8)  # SmolLM2: K = 576, G = 64, 9 groups
    scales = torch.rand(6, 9, generator=g).half()
    zeros = pack_int4(z)
    assert zeros.shape == (6, 5) and zeros.dtype == torch.uint8
    assert torch.equal(zeros[:, 0], z[:, 0] | (z[:, 1] << 4))  # group 2j low nibble, 2j+1 high nibble
    assert torch.equal(zeros[:, 4], z[:, 8])  # the last byte's high nibble is 0
    w = Int4Weight(pack_int4(q), scales, zeros, 64)
    assert torch.equal(w.unpacked_zeros(), z)
    expected = (q.float() - z.float().repeat_interleave(64, 1)) * scales.float().repeat_interleave(64, 1)
    assert torch.equal(w.dequantize(), expected)
    for start, end in ((64, 576), (128, 448), (0, 64)):  # cuts at an odd group, odd group counts
        cut = select_columns(w, start, end)
        assert cut.zeros.shape == (6, ((end - start) // 64 + 1) // 2)
        assert torch.equal(cut.dequantize(), expected[:, start:end])


def weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    w[0, :128] = w[0, :128].abs() + 1  # a group of one sign only
    w[1, :128] = 0  # an all-zero group
    w[2] *= 1e-3  # tiny values: scales near float16's subnormals
    w[3, 5] = 40.0  # an outlier
    return [w, w.half(), w.bfloat16()]


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_within_half_a_step(group_size):
    for w in weights():
        q = quantize_int4(w, group_size)
        assert (
            q.qweight.dtype == torch.uint8
            and q.zeros.dtype == torch.uint8
            and q.scales.dtype == torch.float16
        )
        assert q.zeros.shape == (16, 256 // group_size // 2)
        assert q.unpacked_zeros().max() <= 15
        step = q.scales.float().repeat_interleave(group_size, dim=1)
        assert ((q.dequantize() - w.float()).abs() <= step / 2).all()


def test_int8_error_within_half_a_step():
    for w in weights():
        q = quantize_int8(w)
        assert q.qweight.dtype == torch.int8 and q.scales.shape == (16,)
        assert ((q.dequantize() - w.float()).abs() <= q.scales.float().unsqueeze(1) / 2).all()


def test_float_zero_points_and_grouped_int8():
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    scales, mins = torch.rand(3, 2).half(), torch.randn(3, 2).half()
    w = Int4Weight(pack_int4(q), scales, mins, 32)
    expected = q.float() * scales.float().repeat_interleave(32, 1) + mins.float().repeat_interleave(32, 1)
    assert torch.equal(w.dequantize(), expected)
    assert w.format_name == "int4 g32 min"
    qi = torch.randint(-127, 128, (3, 64), dtype=torch.int8)
    w8 = Int8Weight(qi, scales, 32)
    assert torch.equal(w8.dequantize(), qi.float() * scales.float().repeat_interleave(32, 1))
    assert w8.format_name == "int8 g32"


def test_group_size_falls_back_where_it_does_not_divide():
    assert int4_group_size(4096, 128) == 128
    assert int4_group_size(576, 128) == 64  # SmolLM2's hidden size
    assert int4_group_size(96, 128) == 32
    assert int4_group_size(256, 32) == 32
    with pytest.raises(ValueError):
        int4_group_size(48, 128)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(8)])
def test_row_operations_and_linear_dispatch(spec):
    w = torch.randn(24, 128)
    q = spec.quantize(w)
    parts = split_weight(q, [8, 4, 12])
    assert [p.shape for p in parts] == [(8, 128), (4, 128), (12, 128)]
    assert torch.equal(concat_weights(parts).dequantize(), q.dequantize())
    perm = torch.randperm(24)
    assert torch.equal(select_rows(q, perm).dequantize(), q.dequantize()[perm])
    x = torch.randn(3, 128)
    torch.testing.assert_close(linear(x, q), x @ q.dequantize().T)


@pytest.mark.parametrize("spec", [QuantSpec(4, 128), QuantSpec(4, 32), QuantSpec(8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fake_quantization_is_quantize_then_dequantize(spec, dtype):
    """AWQ's searches score candidates with `fake`, which skips the packing: it must be bit-exact with
    what the packed weight gives."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 576, generator=g).to(dtype)
    groups = 576 // spec.group_size_for(576)
    clip = (torch.rand(48, groups, generator=g) * 0.5 + 0.5, torch.rand(48, groups, generator=g) * 0.5 + 0.5)
    for c in ((1.0, 1.0), (0.8, 0.9), clip):
        assert torch.equal(spec.fake(w, c), spec.quantize(w, c).dequantize(dtype))
