"""AutoAWQ "GEMM" checkpoints, converted to perfxllm's int4 layout at load.

AutoAWQ stores a projection W [M, K] transposed and packs 8 output channels into each int32:
    qweight int32   [K, M // 8]
    qzeros  int32   [K // G, M // 8]
    scales  float16 [K // G, M]
with W[m, k] = (q[k, m] - z[k // G, m]) * scales[k // G, m]. Nibble i (bits 4i..4i+3) of int32 column c
holds output channel 8c + AWQ_ORDER[i].
"""

from __future__ import annotations

import torch

from perfxllm.errors import ModelLoadError
from perfxllm.quant.formats import Int4Weight, pack_int4

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_FIELDS = ("qweight", "qzeros", "scales")


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C // 8] in AutoAWQ's order -> uint8 [R, C] in natural column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # nibbles[..., i] is channel AWQ_ORDER[i]
    inverse = [AWQ_ORDER.index(j) for j in range(8)]
    return nibbles[..., inverse].reshape(packed.shape[0], -1).to(torch.uint8)


def from_autoawq(name: str, parts: dict[str, torch.Tensor], group_size: int) -> Int4Weight:
    qweight, qzeros, scales = (parts[f] for f in AWQ_FIELDS)
    k, m = qweight.shape[0], qweight.shape[1] * 8
    expected = {
        "qweight": (torch.int32, (k, m // 8)),
        "qzeros": (torch.int32, (k // group_size, m // 8)),
        "scales": (torch.float16, (k // group_size, m)),
    }
    for field, (dtype, shape) in expected.items():
        t = parts[field]
        if k % group_size or t.dtype != dtype or tuple(t.shape) != shape:
            raise ModelLoadError(
                f"{name}.{field} is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}, expected "
                f"{str(dtype).removeprefix('torch.')} {shape} for AutoAWQ GEMM with group_size {group_size}"
            )
    return Int4Weight(
        pack_int4(unpack_awq(qweight).T),
        scales.T.contiguous(),
        pack_int4(unpack_awq(qzeros).T),
        group_size,
    )
