"""Round-to-nearest quantization into the formats of perfxllm.quant.formats: the RTN baseline, and the
quantizer that AWQ calls once it has chosen scales and clipping."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perfxllm.errors import PerfxError
from perfxllm.model.config import ModelConfig
from perfxllm.quant.formats import Int4Weight, Int8Weight, int4_group_size, pack_int4


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """s rounded to float16, never below s: values at the range's ends then stay within half a step."""
    s = s.clamp(min=1e-7)
    s16 = s.to(torch.float16)
    return torch.where(s16.float() < s, torch.nextafter(s16, torch.full_like(s16, torch.inf)), s16)


# Factors (each [M, K // G] or a number) on the low and the high end of each group's quantization range.
Clip = tuple[torch.Tensor | float, torch.Tensor | float]
NO_CLIP: Clip = (1.0, 1.0)


def _int4_codes(w: torch.Tensor, group_size: int, clip: Clip) -> tuple[torch.Tensor, ...]:
    """float32 int4 values [M, K // G, G], float16 scales and float32 zeros [M, K // G]."""
    m, k = w.shape
    wg = w.float().view(m, k // group_size, group_size)
    lo = wg.amin(-1).clamp(max=0) * clip[0]
    hi = wg.amax(-1).clamp(min=0) * clip[1]
    scales = _fp16_scale((hi - lo) / 15)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(wg / s.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, 15)
    return q, scales, zeros


def quantize_int4(w: torch.Tensor, group_size: int, clip: Clip = NO_CLIP) -> Int4Weight:
    """Asymmetric min/max per group. The range always holds 0 so that the zero point is an int4 value and
    every element is within scales/2 of its original; clip shrinks either end."""
    q, scales, zeros = _int4_codes(w, group_size, clip)
    return Int4Weight(pack_int4(q.view(w.shape)), scales, pack_int4(zeros), group_size)


def _int8_codes(w: torch.Tensor, clip: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = w.float().abs().amax(-1, keepdim=True) * clip
    scales = _fp16_scale(absmax / 127)
    return torch.round(w.float() / scales.float()).clamp(-127, 127), scales


def quantize_int8(w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> Int8Weight:
    """Symmetric per output channel; clip ([M, 1] or a number) shrinks the range."""
    q, scales = _int8_codes(w, clip)
    return Int8Weight(q.to(torch.int8), scales.view(-1))


@dataclass(frozen=True)
class QuantSpec:
    bits: int  # 4 or 8
    group_size: int = 128  # the int4 group size asked for; int8 is per output channel

    def group_size_for(self, k: int) -> int:
        """The group size of a layer with K input channels (int8: the whole row)."""
        return int4_group_size(k, self.group_size) if self.bits == 4 else k

    def check_fits(self, cfg: ModelConfig, name: str) -> None:
        """A PerfxError naming the model unless every projection's input width takes a group size."""
        try:
            for k in (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size):
                self.group_size_for(k)
        except ValueError as e:
            raise PerfxError(f"{name}: {e}") from None

    def quantize(self, w: torch.Tensor, clip: Clip = NO_CLIP) -> Int4Weight | Int8Weight:
        """clip: int8's range is symmetric, so it takes clip's high end for both."""
        if self.bits == 4:
            return quantize_int4(w, self.group_size_for(w.shape[1]), clip)
        return quantize_int8(w, clip[1])

    def fake(self, w: torch.Tensor, clip: Clip = NO_CLIP) -> torch.Tensor:
        """Quantize then dequantize: the weight as the quantized model will see it, equal to
        quantize(w, clip).dequantize(w.dtype) without packing and unpacking (AWQ's searches call it
        hundreds of times per layer)."""
        if self.bits == 4:
            q, scales, zeros = _int4_codes(w, self.group_size_for(w.shape[1]), clip)
            w_hat = (q - zeros.unsqueeze(-1)) * scales.float().unsqueeze(-1)
        else:
            q, scales = _int8_codes(w, clip[1])
            w_hat = q * scales.float()
        return w_hat.view(w.shape).to(w.dtype)
