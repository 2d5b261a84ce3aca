"""Quantized matmul on the CPU: y = x @ W.T for float activations x [T, K] and an int4 or int8 weight W [M, K]
in perfxllm.quant.formats' layout, through the C kernels of csrc/quant_matmul.c (see there for how they
work: x in int16 blocks, integer dot products). `prepack` makes the one conversion they need at load time:
int4 integer zero points are unpacked to a byte each; the packed nibbles, the scales and GGUF Q4_1's float16
minima are used as stored. Inputs of more than GEMM_MIN_TOKENS rows (prefill) take a float32
GEMM on the weight dequantized by a C loop instead, which is faster there: a block of rows at a time, small
enough to stay in cache for the GEMM that reads it (a large weight dequantized whole went out to memory and
back: a 7B model's 11008 x 4096 projection took 123 ms at 48 tokens, against 48 ms in blocks).
The reference is the format's own `matmul` (dequantize, then a float32 matmul).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from perfxllm.kernels import cpu_lib
from perfxllm.quant.formats import Int4Weight, Int8Weight, int4_format_name, int8_format_name

GEMM_MIN_TOKENS = 40  # measured (SmolLM2-135M, 2 cores): at 36 tokens the kernels were still 4% faster
GEMM_BLOCK_WEIGHTS = 2**20  # weights dequantized at a time for the GEMM: 4 MB of float32
X_BLOCKS = (128, 64, 32)  # int8 weights: x is quantized in blocks of the largest of these dividing G

_scratch = torch.empty(0)


def _scratch_of(numel: int) -> int:
    """A float32 work buffer of numel, grown, never shrunk (the engine calls kernels from one thread)."""
    global _scratch
    if _scratch.numel() < numel:
        _scratch = torch.empty(max(numel, 2 * _scratch.numel()))
    return _scratch.data_ptr()


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as float32 [T, K], contiguous: x itself in the common case."""
    if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()


def _out(x: torch.Tensor, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y if x2 is x else y.view(*x.shape[:-1], y.shape[1]).to(x.dtype)


def _dequantized_matmul(
    x2: torch.Tensor, m: int, dequantize_rows: Callable[[int, torch.Tensor], None]
) -> torch.Tensor:
    """x2 @ W.T through float32 GEMMs over blocks of W's rows, each dequantized just before its GEMM."""
    k = x2.shape[1]
    rows = min(m, max(1, GEMM_BLOCK_WEIGHTS // k))
    y, block = torch.empty(x2.shape[0], m), torch.empty(rows, k)
    for r0 in range(0, m, rows):
        w = block[: min(rows, m - r0)]
        dequantize_rows(r0, w)
        torch.mm(x2, w.t(), out=y[:, r0 : r0 + w.shape[0]])
    return y


@dataclass
class CPUInt4Weight:
    qweight: torch.Tensor  # uint8 [M, K // 2], the spec's nibble order
    scales: torch.Tensor  # float16 [M, K // G]
    zeros: torch.Tensor  # uint8 [M, K // G] zero points: W = (q - z) * s; or float16 minima: W = q * s + z
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2

    @property
    def format_name(self) -> str:
        return int4_format_name(self.group_size, self.zeros.is_floating_point())

    def dequantize(self) -> torch.Tensor:
        w = torch.empty(self.shape)
        self._dequantize_rows(0, w)
        return w

    def _dequantize_rows(self, first: int, out: torch.Tensor) -> None:
        """Rows first .. first + len(out) of W into out."""
        cpu_lib.load().int4_dequantize(
            self.qweight[first:].data_ptr(), self.scales[first:].data_ptr(), self.zeros[first:].data_ptr(),
            self.zeros.is_floating_point(), out.shape[0], out.shape[1], self.group_size, out.data_ptr(),
        )  # fmt: skip

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        m, k = self.shape
        x2 = _rows(x)
        t, g = x2.shape[0], self.group_size
        if t > GEMM_MIN_TOKENS:
            return _out(x, x2, _dequantized_matmul(x2, m, self._dequantize_rows))
        y = torch.empty(t, m)
        cpu_lib.load().int4_matmul(
            x2.data_ptr(), t, k, self.qweight.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr(),
            self.zeros.is_floating_point(), m, g, y.data_ptr(), _scratch_of(t * (k // 2 + 2 * k // g)),
        )  # fmt: skip
        return _out(x, x2, y)


@dataclass
class CPUInt8Weight:
    qweight: torch.Tensor  # int8 [M, K]
    scales: torch.Tensor  # float16 [M, K // G] (G = K: one scale per output channel)
    group_size: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def format_name(self) -> str:
        return int8_format_name(self.group_size)

    def dequantize(self) -> torch.Tensor:
        w = torch.empty(self.shape)
        self._dequantize_rows(0, w)
        return w

    def _dequantize_rows(self, first: int, out: torch.Tensor) -> None:
        """Rows first .. first + len(out) of W into out."""
        m, k = out.shape
        cpu_lib.load().int8_dequantize(
            self.qweight[first:].data_ptr(), self.scales[first:].data_ptr(), m, k, self.group_size or k,
            out.data_ptr(),
        )  # fmt: skip

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        m, k = self.shape
        x2 = _rows(x)
        t, g = x2.shape[0], self.group_size or k
        if t > GEMM_MIN_TOKENS:
            return _out(x, x2, _dequantized_matmul(x2, m, self._dequantize_rows))
        xg = next(b for b in X_BLOCKS if g % b == 0)
        y = torch.empty(t, m)
        cpu_lib.load().int8_matmul(
            x2.data_ptr(), t, k, self.qweight.data_ptr(), self.scales.data_ptr(), m, g, xg, y.data_ptr(),
            _scratch_of(t * (k // 2 + k // xg)),
        )  # fmt: skip
        return _out(x, x2, y)


def supports(w: Int4Weight | Int8Weight) -> bool:
    """Whether the kernels take this weight (and could be built here)."""
    g = w.group_size or w.shape[1]
    return g % 32 == 0 and w.shape[1] % g == 0 and cpu_lib.load() is not None


def prepack(w: Int4Weight | Int8Weight) -> CPUInt4Weight | CPUInt8Weight:
    if isinstance(w, Int8Weight):
        scales = w.scales.to(torch.float16).reshape(w.shape[0], -1).contiguous()
        return CPUInt8Weight(w.qweight.contiguous(), scales, w.group_size)
    zeros = w.unpacked_zeros()
    zeros = zeros.to(torch.float16) if zeros.is_floating_point() else zeros
    return CPUInt4Weight(
        w.qweight.contiguous(), w.scales.to(torch.float16).contiguous(), zeros.contiguous(), w.group_size
    )
