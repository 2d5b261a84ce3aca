"""The SwiGLU activation on a fused gate_up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from perfxllm.kernels import decode_ops_cpu, runs_on_kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate | up) -> silu(gate) * up, [T, I]."""
    if runs_on_kernels(gate_up):
        from perfxllm.kernels.silu_mul import silu_mul

        return silu_mul(gate_up)
    if decode_ops_cpu.available(gate_up):
        return decode_ops_cpu.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
