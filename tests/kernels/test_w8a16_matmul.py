"""W8A16 matmul against the float32 reference from the spec format."""

from __future__ import annotations

import pytest
import torch

from perfxllm.kernels import w8a16_matmul as mod
from perfxllm.quant.formats import Int8Weight

TOL = 3e-3


@pytest.mark.parametrize(
    ("n", "m", "k", "g"), [(1, 40, 100, None), (16, 24, 96, None), (17, 33, 64, 32), (5, 48, 128, 32)]
)
def test_matches_reference(n, m, k, g, device, rel_err):
    gen = torch.Generator().manual_seed(n * 1000 + k)
    q = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    scales = (
        torch.rand(m, generator=gen) if g is None else torch.rand(m, k // g, generator=gen)
    ) * 0.01 + 1e-3
    w = Int8Weight(q, scales.half(), g)
    x = torch.randn(n, k, generator=gen).half()
    out = torch.full((n, m), float("nan"), dtype=torch.float16, device=device)
    mod.w8a16_matmul(x.to(device), mod.prepack(w.to(device)), out=out)
    assert rel_err(out, mod.w8a16_matmul_ref(x, w)) < TOL


def test_errors(device):
    w = mod.prepack(Int8Weight(torch.ones(8, 32, dtype=torch.int8), torch.ones(8).half()).to(device))
    with pytest.raises(ValueError, match="dtype"):
        mod.w8a16_matmul(torch.randn(2, 32, device=device), w)
    with pytest.raises(ValueError, match="K=32"):
        mod.w8a16_matmul(torch.randn(2, 16, device=device).half(), w)
    with pytest.raises(ValueError, match="shape"):
        mod.w8a16_matmul(torch.randn(2, 32, device=device).half(), w, out=torch.empty(3, 8).half())
