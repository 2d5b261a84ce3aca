"""The CPU's quantized matmul (C kernels) against the formats' reference: dequantize, then a float32 matmul."""

from __future__ import annotations

import pytest
import torch

from perfxllm.kernels import cpu_lib, quant_matmul_cpu
from perfxllm.kernels.quant_matmul_cpu import GEMM_MIN_TOKENS, prepack
from perfxllm.layers.linear import for_device
from perfxllm.quant.formats import Int4Weight, Int8Weight, pack_int4

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(cpu_lib.load() is None, reason="no C compiler to build the CPU kernels")


def random_int4(n: int, k: int, g: int, minima: bool, gen: torch.Generator) -> Int4Weight:
    q = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 1e-3).half()
    if minima:  # GGUF Q4_1
        zeros = (torch.randn(n, k // g, generator=gen) * 0.1).half()
    else:
        zeros = pack_int4(torch.randint(0, 16, (n, k // g), generator=gen))
    return Int4Weight(pack_int4(q), scales, zeros, g)


def random_int8(n: int, k: int, g: int | None, gen: torch.Generator) -> Int8Weight:
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, generator=gen) if g is None else torch.rand(n, k // g, generator=gen)) * 0.01
    return Int8Weight(q, scales.half(), g)


def check(y: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert not y.isnan().any()
    assert float((y.float() - ref.float()).norm() / ref.float().norm()) < tol


WEIGHTS = {
    "int4 g32 min (Q4_1)": lambda gen: random_int4(100, 576, 32, True, gen),
    "int4 g64 zeros, 9 groups": lambda gen: random_int4(72, 576, 64, False, gen),
    "int4 g128 zeros": lambda gen: random_int4(48, 1536, 128, False, gen),
    "int8 g32 (Q8_0)": lambda gen: random_int8(100, 576, 32, gen),
    "int8 per channel": lambda gen: random_int8(40, 576, None, gen),
}


@pytest.mark.parametrize("name", WEIGHTS)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, GEMM_MIN_TOKENS + 3])
def test_matches_reference(name, tokens):
    """x is rounded to int16 blocks in the kernels (about 1e-5 relative); the GEMM path of long inputs
    dequantizes exactly. Fresh random weights and inputs each run."""
    gen = torch.Generator().manual_seed(tokens)
    w = WEIGHTS[name](gen)
    x = torch.randn(tokens, w.shape[1], generator=gen) * 3
    x[:, 7] = 40.0  # an outlier channel, as real activations have
    check(prepack(w).matmul(x), w.matmul(x), 1e-4)


@pytest.mark.parametrize(("g", "minima"), [(32, True), (64, False), (128, False), (16, True), (48, False)])
def test_dequantize_is_exactly_the_formats(g, minima):
    """The C dequantize (vectorised over 32 weights of a group, plain C for the rest) feeds the prefill GEMM
    the reference's very weights, bit for bit."""
    gen = torch.Generator().manual_seed(g)
    w = random_int4(40, 4 * g, g, minima, gen)
    assert torch.equal(prepack(w).dequantize(), w.dequantize())


@pytest.mark.parametrize("name", ["int4 g32 min (Q4_1)", "int4 g128 zeros", "int8 g32 (Q8_0)"])
def test_the_gemm_path_in_blocks_of_rows(name, monkeypatch):
    """Long inputs: W dequantized a block of rows at a time (here 7 rows: blocks that do not divide M)."""
    gen = torch.Generator().manual_seed(3)
    w = WEIGHTS[name](gen)
    monkeypatch.setattr(quant_matmul_cpu, "GEMM_BLOCK_WEIGHTS", 7 * w.shape[1])
    x = torch.randn(GEMM_MIN_TOKENS + 5, w.shape[1], generator=gen)
    check(prepack(w).matmul(x), w.matmul(x), 1e-5)


def test_other_dtypes_and_shapes_of_x():
    gen = torch.Generator().manual_seed(1)
    w = random_int4(64, 256, 32, False, gen)
    x = torch.randn(2, 3, 256, generator=gen).bfloat16()
    y = prepack(w).matmul(x)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    check(y, w.matmul(x.float()), 1e-2)


def test_for_device_takes_the_kernels_or_dense_weights(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    w = random_int4(32, 128, 32, True, gen)
    assert isinstance(for_device(w, CPU, torch.float32), quant_matmul_cpu.CPUInt4Weight)
    monkeypatch.setattr(cpu_lib, "load", lambda: None)  # no C compiler: dense, dequantized once
    dense = for_device(w, CPU, torch.float32)
    assert isinstance(dense, torch.Tensor) and torch.equal(dense, w.dequantize())
