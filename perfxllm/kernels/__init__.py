"""The Triton operator library. Each module holds one op: its kernel, its launcher and its torch reference.

Importing a Triton kernel module imports triton, so the layers import them only once `runs_on_kernels` says
yes: the CPU path never needs triton.

Integer arguments that change from step to step (token counts, block-table widths, partition counts) are
marked do_not_specialize: otherwise Triton compiles a new variant of the kernel the first time such a value
is divisible by 16, or is 1, in the middle of serving (about a second of compiling each: 0.8-1.4 s for the
prefill attention kernel on this project's CPU)."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def runs_on_kernels(x: torch.Tensor) -> bool:
    """Whether activations like x take the Triton kernels: half precision on a CUDA GPU. float32 on the GPU
    stays on the torch reference, which is what the exact CPU-vs-GPU checks compare."""
    return x.is_cuda and x.dtype in KERNEL_DTYPES
