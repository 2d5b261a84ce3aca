"""Fused residual add + RMSNorm against the unfused float32 sequence."""

from __future__ import annotations

import pytest
import torch

from perfxllm.kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_ref

TOL = {torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("t", "h"), [(1, 64), (7, 576), (3, 1000)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_matches_reference(t, h, dtype, with_residual, device, rel_err):
    gen = torch.Generator().manual_seed(t * h)
    x = torch.randn(t, h, generator=gen).to(dtype)
    res = torch.randn(t, h, generator=gen).to(dtype) if with_residual else None
    w = (torch.rand(h, generator=gen) + 0.5).to(dtype)
    ref = add_rmsnorm_ref(x, res, w, 1e-6)
    got = add_rmsnorm(x.to(device), None if res is None else res.to(device), w.to(device), 1e-6)
    if with_residual:
        assert rel_err(got[0], ref[0]) < TOL[dtype]
        assert torch.equal(got[1].cpu(), ref[1])
    else:
        assert rel_err(got, ref) < TOL[dtype]


def test_strided_rows(device, rel_err):
    x = torch.randn(4, 256).half()[:, :128]
    w = torch.rand(128).half()
    assert (
        rel_err(add_rmsnorm(x.to(device), None, w.to(device), 1e-5), add_rmsnorm_ref(x, None, w, 1e-5)) < 2e-3
    )


def test_errors(device):
    x = torch.randn(2, 64, device=device).half()
    with pytest.raises(ValueError, match="weight must have shape"):
        add_rmsnorm(x, None, torch.ones(32, device=device).half(), 1e-6)
    with pytest.raises(ValueError, match="residual must have dtype"):
        add_rmsnorm(x, x.float(), torch.ones(64, device=device).half(), 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        add_rmsnorm(x.long(), None, torch.ones(64, device=device).half(), 1e-6)
