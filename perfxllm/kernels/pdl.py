"""Programmatic dependent launch (Hopper and later): a kernel's programs start while the kernel before it
finishes, so a decode step of some 300 small kernels stops paying a launch and a ramp-up at each one.

Every Triton kernel here takes a `PDL` constexpr and calls `wait_for_inputs(PDL)` before it reads anything
another kernel wrote and before it writes anything; launched with `launch_pdl=True`, its programs may run
ahead of that call only on data no kernel writes (the GEMV prefetches its weights). The wait returns once the
previous kernel has completed and its writes are visible, and only then lets the next kernel launch: at most
two kernels overlap, and every kernel two or more back has completed.

PERFXLLM_PDL=0 turns it off (A/B runs); it is off under the interpreter and before sm_90.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from perfxllm.kernels._common import interpreting


def pdl_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or interpreting() or os.environ.get("PERFXLLM_PDL", "1") == "0":
        return False
    return _sm90_or_later(device.index if device.index is not None else torch.cuda.current_device())


def pdl_launch_args(device: torch.device) -> dict[str, bool]:
    """A kernel's launch arguments for it: its PDL constexpr and Triton's launch_pdl, both on or both off."""
    on = pdl_enabled(device)
    return dict(PDL=on, launch_pdl=on)


@functools.cache
def _sm90_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Start reading memory at ptrs into L2, holding no registers and waiting for nothing: one
    `prefetch.global.L2` (the 128-byte line of one pointer) for each four pointers a thread holds, in the
    order of its registers. Which pointers those are follows the layout Triton gives ptrs: for the GEMV's
    512 x 128 tile (one element a thread a row) they lie in four rows, so a quarter of the rows' lines are
    read (kernels-notes, v10). For the time before wait_for_inputs returns."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$4]; // dummy $0 $1 $2 $3 $5 $6 $7",
        "=r,=r,=r,=r,l,l,l,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=4,
    )


@triton.jit
def prefetch_l2_each(ptrs):
    """prefetch_l2 for pointers that each start a line of their own: one `prefetch.global.L2` for every pointer."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )
