"""RMSNorm, with the residual add fused into the same call as the GPU kernel does it."""

from __future__ import annotations

import torch
from torch import nn

from perfxllm.kernels import decode_ops_cpu, runs_on_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        if runs_on_kernels(x):
            from perfxllm.kernels.add_rmsnorm import add_rmsnorm

            return add_rmsnorm(x, residual, self.weight, self.eps)
        if decode_ops_cpu.available(x):
            return decode_ops_cpu.add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
        return out if residual is None else (out, residual)
