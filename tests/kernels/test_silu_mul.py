"""SiLU(gate) * up against the float32 reference."""

from __future__ import annotations

import pytest
import torch

from perfxllm.kernels.silu_mul import silu_mul, silu_mul_ref


@pytest.mark.parametrize(("t", "inter"), [(1, 64), (5, 1536), (3, 1000)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matches_reference(t, inter, dtype, device, rel_err):
    x = (torch.randn(t, 2 * inter, generator=torch.Generator().manual_seed(inter)) * 3).to(dtype)
    out = torch.full((t, inter), float("nan"), dtype=dtype, device=device)
    silu_mul(x.to(device), out=out)
    assert rel_err(out, silu_mul_ref(x)) < (1e-3 if dtype == torch.float16 else 1e-6)


def test_errors(device):
    with pytest.raises(ValueError, match="even last dimension"):
        silu_mul(torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="dtype"):
        silu_mul(torch.ones(2, 8, device=device, dtype=torch.int32))
