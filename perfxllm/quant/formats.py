"""Packed weight formats: the spec every producer (quantizers, GGUF/AutoAWQ import) and every consumer
(torch reference, CPU fast path, Triton kernels) agrees on.

A linear layer computes y = x @ W.T with W of shape [M, K] (M = out_features, K = in_features).

Int4 (asymmetric, per group of G consecutive input channels, G in {32, 64, 128}; default 128):
    qweight  uint8   [M, K // 2]   byte j of row m holds W_q[m, 2j] in its low nibble and W_q[m, 2j+1]
                                  in its high nibble; W_q in 0..15
    scales   float16 [M, K // G]
    zeros    uint8   [M, K // G]   the zero point of each group, 0..15 (int4 values, one per byte)
    W[m, k] = (W_q[m, k] - zeros[m, k // G]) * scales[m, k // G]
    or, for GGUF Q4_1 whose groups have a float minimum instead of an integer zero point:
    zeros    float16 [M, K // G]   the group's minimum m
    W[m, k] = W_q[m, k] * scales[m, k // G] + zeros[m, k // G]
    K must be a multiple of G (and so of 2). Groups never straddle rows.

Int8 (symmetric, per output channel):
    qweight  int8    [M, K]
    scales   float16 [M]
    W[m, k] = qweight[m, k] * scales[m]

Dense weights (fp32 / fp16 / bf16) stay plain torch tensors [M, K].

Consumers that want another layout (e.g. GPU kernels with 16-byte loads) repack once at load time from this
one; the format on disk and in memory between modules is this one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Int4Weight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    def to(self, device: torch.device | str) -> Int4Weight:
        return Int4Weight(
            self.qweight.to(device), self.scales.to(device), self.zeros.to(device), self.group_size
        )

    def unpack(self) -> torch.Tensor:
        """The int4 values W_q as uint8 [M, K]."""
        lo = self.qweight & 0x0F
        hi = self.qweight >> 4
        return torch.stack([lo, hi], dim=-1).reshape(self.qweight.shape[0], -1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        m, k = self.shape
        q = self.unpack().to(torch.float32).view(m, k // self.group_size, self.group_size)
        z = self.zeros.to(torch.float32).unsqueeze(-1)
        s = self.scales.to(torch.float32).unsqueeze(-1)
        w = q * s + z if self.zeros.is_floating_point() else (q - z) * s
        return w.reshape(m, k).to(dtype)


@dataclass
class Int8Weight:
    qweight: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.qweight.to(device), self.scales.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scales.to(torch.float32).unsqueeze(-1)).to(dtype)


def pack_int4(wq: torch.Tensor) -> torch.Tensor:
    """uint8 [M, K] of values 0..15 -> uint8 [M, K // 2] in the pack order above."""
    wq = wq.to(torch.uint8)
    return wq[:, 0::2] | (wq[:, 1::2] << 4)
