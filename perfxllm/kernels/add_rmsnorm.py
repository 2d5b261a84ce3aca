"""Fused residual add + RMSNorm in one pass over the rows.

add_rmsnorm(x, residual, weight, eps) -> (normed, new_residual) with
    new_residual = x + residual            (rounded to the input dtype, as the unfused model does)
    normed = new_residual / sqrt(mean(new_residual^2) + eps) * weight    (statistics in float32)
and with residual=None plain RMSNorm: normed = rmsnorm(x) * weight.

x, residual: float16/bfloat16/float32 [T, H] (or [..., H]), same dtype; weight: [H] of any float dtype.
Outputs have x's dtype. One program per row: H up to 16384 fits one block in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from perfxllm.kernels._common import check_last_dim_contiguous, check_tensor
from perfxllm.kernels.pdl import pdl_launch_args, wait_for_inputs

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HIDDEN = 16384


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    H,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    wait_for_inputs(PDL)
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
        tl.store(res_out_ptr + row * stride_ro + offs, h, mask=mask)
    hf = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (hf * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """See the module docstring. Returns normed alone when residual is None, else (normed, new_residual)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    hidden = x.shape[-1]
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, shape=(hidden,), device=x.device, contiguous=True)
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} is over the {MAX_HIDDEN} this kernel holds in one block")
    x2 = x.reshape(-1, hidden)
    check_last_dim_contiguous("x", x2)
    out = torch.empty_like(x2)
    if residual is not None:
        check_tensor("residual", residual, dtypes=(x.dtype,), shape=tuple(x.shape), device=x.device)
        r2 = residual.reshape(-1, hidden)
        check_last_dim_contiguous("residual", r2)
        res_out = torch.empty_like(x2)
    else:
        r2 = res_out = x2
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(hidden)
        _add_rmsnorm_kernel[(rows,)](
            x2,
            r2,
            weight,
            out,
            res_out,
            hidden,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            res_out.stride(0),
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
            **pdl_launch_args(x.device),
        )
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), res_out.view(x.shape)


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The unfused torch sequence; the norm in float32 and returned in float32."""
    h = x if residual is None else x + residual
    hf = h.float()
    out = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out if residual is None else (out, h)
