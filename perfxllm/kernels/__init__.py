"""The Triton operator library. Each module holds one op: its kernel, its launcher and its torch reference.

Importing a kernel module imports triton, so the layers import them only once `runs_on_kernels` says yes:
the CPU path never needs triton."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def runs_on_kernels(x: torch.Tensor) -> bool:
    """Whether activations like x take the Triton kernels: half precision on a CUDA GPU. float32 on the GPU
    stays on the torch reference, which is what the exact CPU-vs-GPU checks compare."""
    return x.is_cuda and x.dtype in KERNEL_DTYPES
