"""SiLU-and-multiply on the fused gate_up projection: [T, 2I] (gate | up) -> silu(gate) * up, [T, I].

Input float16/bfloat16/float32 [T, 2I] (or [..., 2I]) with unit stride in the last dimension; output
contiguous in the input's dtype. Computed in float32; one elementwise kernel over (rows, column blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from perfxllm.kernels._common import check_last_dim_contiguous, check_tensor
from perfxllm.kernels.pdl import pdl_launch_args, wait_for_inputs

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    wait_for_inputs(PDL)
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:], [..., I]. out: optional contiguous destination."""
    check_tensor("x", x, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension (gate | up), got shape {list(x.shape)}")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    check_last_dim_contiguous("x", x2)
    if out is None:
        out = x.new_empty(*x.shape[:-1], inter)
    check_tensor(
        "out", out, dtypes=(x.dtype,), shape=(*x.shape[:-1], inter), device=x.device, contiguous=True
    )
    rows = x2.shape[0]
    if rows and inter:
        _silu_mul_kernel[(rows, triton.cdiv(inter, BLOCK))](
            x2, out, inter, x2.stride(0), inter, BLOCK=BLOCK, num_warps=4, **pdl_launch_args(x.device)
        )
    return out


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """float32 reference."""
    gate, up = x.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
