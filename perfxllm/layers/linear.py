"""Linear layers. Every projection goes through `linear(x, weight)`, which dispatches on the weight's
format (dense tensor or a packed format from perfxllm.quant.formats) and device, so that model code never
changes when a faster kernel is plugged in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from perfxllm.kernels import KERNEL_DTYPES
from perfxllm.quant.formats import Int4Weight, Int8Weight, map_tensors, pack_int4, tensor_fields

Weight = torch.Tensor | Int4Weight | Int8Weight


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [..., K] and W of shape [M, K] in any supported format."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    y = weight.matmul(x)
    return y if bias is None else y + bias


def for_device(weight: Weight, device: torch.device, dtype: torch.dtype) -> Weight:
    """The layout the device's fast kernel reads, made once at load time: the Triton kernels' on the GPU in
    half precision, the C kernels' on the CPU (dense if they cannot be built); elsewhere the weight keeps the
    reference format, whose `matmul` dequantizes. dtype: the activations' dtype."""
    if isinstance(weight, torch.Tensor):
        return weight
    if device.type == "cpu":
        from perfxllm.kernels import quant_matmul_cpu

        if quant_matmul_cpu.supports(weight):
            return quant_matmul_cpu.prepack(weight)
        return weight.dequantize(dtype)  # faster than dequantizing at every call
    if device.type == "cuda" and dtype in KERNEL_DTYPES:
        if isinstance(weight, Int4Weight):
            from perfxllm.kernels.w4a16_matmul import prepack

            return prepack(weight)
        from perfxllm.kernels.w8a16_matmul import prepack

        return prepack(weight)
    return weight


def prepare_linears(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Swap every projection's weight for its device layout (after loading: fusing needs the spec format)."""
    for module in model.modules():
        if isinstance(module, Linear) and module.weight is not None:
            module.weight = for_device(module.weight, device, dtype)


class Linear(nn.Module):
    """A projection [in_features] -> [out_features]; `weight` is set by the loader (dense or packed)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: Weight | None = None
        self.bias: torch.Tensor | None = None
        self.has_bias = bias
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # tensor parallel: the all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)
        return y if self.reduce is None else self.reduce(y)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.has_bias}"


def _format(w: Weight) -> str:
    return "dense" if isinstance(w, torch.Tensor) else w.format_name


def concat_weights(shards: list[Weight]) -> Weight:
    """Stack projections that share an input along the output dimension (q/k/v, gate/up). Shards of
    different formats (a GGUF file may store v in Q8_0 and q, k in Q4_0) have no common packed format: they
    are stacked dequantized."""
    first = shards[0]
    if len({_format(s) for s in shards}) > 1:
        return torch.cat([s if isinstance(s, torch.Tensor) else s.dequantize() for s in shards])
    if isinstance(first, torch.Tensor):
        return torch.cat(shards)
    return replace(first, **{f: torch.cat([getattr(s, f) for s in shards]) for f in tensor_fields(first)})


def select_rows(weight: Weight, index: torch.Tensor | slice) -> Weight:
    """The output channels `index` of a weight, in any format."""
    if isinstance(weight, torch.Tensor):
        return weight[index]
    return map_tensors(weight, lambda t: t[index])


def select_columns(weight: Weight, start: int, end: int) -> Weight:
    """The input channels [start, end) of a weight, in any format; a packed weight is cut along whole groups."""
    if isinstance(weight, torch.Tensor):
        return weight[:, start:end].contiguous()
    g = weight.group_size
    if g is not None and (start % g or end % g):
        raise ValueError(f"columns [{start}, {end}) cut through groups of {g}: cannot shard this weight")
    if isinstance(weight, Int4Weight):
        groups = slice(start // g, end // g)
        qweight = weight.qweight[:, start // 2 : end // 2]
        zeros = weight.unpacked_zeros()[:, groups]  # packed zeros: a cut may start inside a byte
        zeros = zeros if zeros.is_floating_point() else pack_int4(zeros)
        return replace(weight, qweight=qweight, scales=weight.scales[:, groups], zeros=zeros)
    scales = weight.scales if g is None else weight.scales[:, start // g : end // g]
    return replace(weight, qweight=weight.qweight[:, start:end], scales=scales)


def split_weight(weight: Weight, sizes: list[int]) -> list[Weight]:
    """The inverse of concat_weights."""
    ends = list(accumulate(sizes))
    return [select_rows(weight, slice(end - n, end)) for n, end in zip(sizes, ends)]
