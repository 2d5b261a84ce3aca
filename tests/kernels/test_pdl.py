"""Programmatic dependent launch: a chain of dependent kernels replayed from a CUDA graph gives what the same
chain gives without it. It is off on the CPU, under the interpreter and when PERFXLLM_PDL=0."""

from __future__ import annotations

import pytest
import torch

from perfxllm.kernels.pdl import pdl_enabled, pdl_launch_args


def test_off_where_it_cannot_run(monkeypatch):
    assert not pdl_enabled(torch.device("cpu"))
    assert pdl_launch_args(torch.device("cpu")) == dict(PDL=False, launch_pdl=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl_enabled(torch.device("cuda"))
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv("PERFXLLM_PDL", "0")
    assert not pdl_enabled(torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="needs sm_90 or later"
)
@pytest.mark.parametrize(("tokens", "prefetch"), [(1, 1), (1, 64), (16, None)])
def test_graph_of_dependent_kernels(tokens, prefetch, monkeypatch, rel_err):
    """Norm, split-K matmul (the GEMV at one token, the tensor-core kernel at 16), SiLU, matmul, layer after
    layer: each kernel reads what the one before wrote, and the matmuls share one split-K workspace. A kernel
    that read its input early, or wrote the workspace while the previous matmul still used it, would give
    garbage in some of the replays. The GEMV prefetches its first K tile's weights or all of them."""
    from perfxllm.kernels import w4a16_matmul as w4
    from perfxllm.kernels.add_rmsnorm import add_rmsnorm
    from perfxllm.kernels.silu_mul import silu_mul

    from .test_w4a16_matmul import random_int4

    hidden, inter, layers = 1024, 2048, 4
    ups = [w4.prepack(random_int4(2 * inter, hidden, 128, seed=i).to("cuda")) for i in range(layers)]
    downs = [w4.prepack(random_int4(hidden, inter, 128, seed=10 + i).to("cuda")) for i in range(layers)]
    norm_w = torch.rand(hidden, device="cuda").half() + 0.5
    if tokens == 1:
        cfg = dict(
            BLOCK_M=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=1, PAIRS=True, PREFETCH=prefetch
        )
    else:  # the tensor-core kernel prefetches nothing
        cfg = dict(BLOCK_N=16, BLOCK_M=64, BLOCK_K=64, SPLIT_K=4, num_warps=4, num_stages=3)

    def forward(x: torch.Tensor) -> torch.Tensor:  # Triton kernels only, from the first norm on
        h, res = x, torch.zeros_like(x)
        for up, down in zip(ups, downs):
            normed, res = add_rmsnorm(h, res, norm_w, 1e-5)
            h = w4.w4a16_matmul(silu_mul(w4.w4a16_matmul(normed, up, config=cfg)), down, config=cfg)
        return add_rmsnorm(h, res, norm_w, 1e-5)[0]

    inputs = [
        torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(s)).half().cuda()
        for s in range(8)
    ]
    monkeypatch.setenv("PERFXLLM_PDL", "0")
    expected = [forward(x) for x in inputs]
    monkeypatch.setenv("PERFXLLM_PDL", "1")
    static_x = inputs[0].clone()
    forward(static_x)  # compiles the PDL variants outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward(static_x)
    for _ in range(10):
        for x, want in zip(inputs, expected):
            static_x.copy_(x)
            graph.replay()
            assert rel_err(static_out, want.float()) < 1e-2
