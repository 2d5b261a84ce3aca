"""Packed weight formats: the spec every producer (quantizers, GGUF/AutoAWQ import) and every consumer
(torch reference, CPU fast path, Triton kernels) agrees on.

A linear layer computes y = x @ W.T with W of shape [M, K] (M = out_features, K = in_features).

Int4 (asymmetric, per group of G consecutive input channels, G in {32, 64, 128}; default 128):
    qweight  uint8   [M, K // 2]   byte j of row m holds W_q[m, 2j] in its low nibble and W_q[m, 2j+1]
                                  in its high nibble; W_q in 0..15
    scales   float16 [M, K // G]
    zeros    uint8   [M, ceil(K // G / 2)]
                                  the zero point Z of each group, 0..15, two per byte in qweight's order:
                                  byte j of row m holds Z[m, 2j] in its low nibble and Z[m, 2j+1] in its
                                  high nibble; when K // G is odd (SmolLM2: K = 576, G = 64, 9 groups) the
                                  last byte's high nibble is 0
    W[m, k] = (W_q[m, k] - Z[m, k // G]) * scales[m, k // G]
    or, for GGUF Q4_1 whose groups have a float minimum instead of an integer zero point (not packed):
    zeros    float16 [M, K // G]   the group's minimum m
    W[m, k] = W_q[m, k] * scales[m, k // G] + zeros[m, k // G]
    Int4Weight.unpacked_zeros() gives Z (or the minima) as [M, K // G] in either case.
    K must be a multiple of G (and so of 2). Groups never straddle rows. A quantizer asked for G = 128 on a
    layer whose K is not a multiple of 128 (SmolLM2's hidden size 576) uses the largest of 64, 32 that
    divides K for that layer; every weight states its own G.

Int8 (symmetric, per output channel):
    qweight  int8    [M, K]
    scales   float16 [M]
    W[m, k] = qweight[m, k] * scales[m]
    or, per group of G input channels (group_size set; GGUF Q8_0 imported natively, G = 32):
    scales   float16 [M, K // G]
    W[m, k] = qweight[m, k] * scales[m, k // G]

Dense weights (fp32 / fp16 / bf16) stay plain torch tensors [M, K].

Every tensor of a packed weight has the output channels as its first dimension, so selecting, permuting or
concatenating rows (fused q/k/v, GGUF's Q/K row order) is the same row operation on each of its tensors.

Consumers that want another layout (e.g. GPU kernels with 16-byte loads) repack once at load time from this
one; the format on disk and in memory between modules is this one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch

INT4_GROUP_SIZES = (128, 64, 32)


@dataclass
class Int4Weight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    @property
    def format_name(self) -> str:
        return int4_format_name(self.group_size, self.zeros.is_floating_point())

    def to(self, device: torch.device | str) -> Int4Weight:
        return map_tensors(self, lambda t: t.to(device))

    def unpack(self) -> torch.Tensor:
        """The int4 values W_q as uint8 [M, K]."""
        return unpack_int4(self.qweight, self.shape[1])

    def unpacked_zeros(self) -> torch.Tensor:
        """The zero point of each group as uint8 [M, K // G], or the float16 minima of the "min" variant."""
        if self.zeros.is_floating_point():
            return self.zeros
        return unpack_int4(self.zeros, self.scales.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        m, k = self.shape
        q = self.unpack().to(torch.float32).view(m, k // self.group_size, self.group_size)
        z = self.unpacked_zeros().to(torch.float32).unsqueeze(-1)
        s = self.scales.to(torch.float32).unsqueeze(-1)
        w = q * s + z if self.zeros.is_floating_point() else (q - z) * s
        return w.reshape(m, k).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T, the reference: dequantize, then a dense matmul."""
        return torch.nn.functional.linear(x, self.dequantize(x.dtype))


@dataclass
class Int8Weight:
    qweight: torch.Tensor
    scales: torch.Tensor
    group_size: int | None = None  # None: one scale per output channel

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def format_name(self) -> str:
        return int8_format_name(self.group_size)

    def to(self, device: torch.device | str) -> Int8Weight:
        return map_tensors(self, lambda t: t.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self.qweight.to(torch.float32)
        s = self.scales.to(torch.float32)
        if self.group_size is None:
            return (q * s.unsqueeze(-1)).to(dtype)
        m, k = self.shape
        return (q.view(m, -1, self.group_size) * s.unsqueeze(-1)).reshape(m, k).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T, the reference: dequantize, then a dense matmul."""
        return torch.nn.functional.linear(x, self.dequantize(x.dtype))


PackedWeight = TypeVar("PackedWeight", Int4Weight, Int8Weight)


def tensor_fields(w: Int4Weight | Int8Weight) -> list[str]:
    return [f.name for f in fields(w) if isinstance(getattr(w, f.name), torch.Tensor)]


def map_tensors(w: PackedWeight, fn) -> PackedWeight:
    """The same weight with fn applied to each of its tensors (fn: Tensor -> Tensor)."""
    return replace(w, **{name: fn(getattr(w, name)) for name in tensor_fields(w)})


def int4_format_name(group_size: int, minima: bool) -> str:
    """How `perfxllm info` and quantization_config.modules name an int4 weight, in any layout."""
    return f"int4 g{group_size}" + (" min" if minima else "")


def int8_format_name(group_size: int | None) -> str:
    return "int8" if group_size is None else f"int8 g{group_size}"


def pack_int4(wq: torch.Tensor) -> torch.Tensor:
    """[M, K] of values 0..15 -> uint8 [M, ceil(K / 2)] in the pack order above; an odd K leaves the last
    byte's high nibble 0."""
    wq = wq.to(torch.uint8)
    if wq.shape[1] % 2:
        wq = torch.nn.functional.pad(wq, (0, 1))
    return wq[:, 0::2] | (wq[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack_int4: uint8 [M, ceil(K / 2)] -> the K values of each row, uint8 [M, K]."""
    values = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return values[:, :k]


def int4_group_size(k: int, wanted: int) -> int:
    """The group size used for a layer of K input channels when `wanted` was asked for (see the spec)."""
    for g in INT4_GROUP_SIZES:
        if g <= wanted and k % g == 0:
            return g
    raise ValueError(f"in_features {k} is not a multiple of 32: it cannot be quantized to int4")
