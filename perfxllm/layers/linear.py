"""Linear layers. Every projection goes through `linear(x, weight)`, which dispatches on the weight's
format (dense tensor or a packed format from perfxllm.quant.formats) and device, so that model code never
changes when a faster kernel is plugged in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perfxllm.quant.formats import Int4Weight, Int8Weight

Weight = torch.Tensor | Int4Weight | Int8Weight


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [..., K] and W of shape [M, K] in any supported format."""
    if isinstance(weight, torch.Tensor):
        return F.linear(x, weight, bias)
    y = F.linear(x, weight.dequantize(x.dtype))
    return y if bias is None else y + bias


class Linear(nn.Module):
    """A projection [in_features] -> [out_features]; `weight` is set by the loader (dense or packed)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: Weight | None = None
        self.bias: torch.Tensor | None = None
        self.has_bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.has_bias}"


def concat_weights(shards: list[Weight]) -> Weight:
    """Stack projections that share an input along the output dimension (q/k/v, gate/up)."""
    first = shards[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(shards)
    if isinstance(first, Int4Weight):
        cat = lambda field: torch.cat([getattr(s, field) for s in shards])  # noqa: E731
        return Int4Weight(cat("qweight"), cat("scales"), cat("zeros"), first.group_size)
    return Int8Weight(torch.cat([s.qweight for s in shards]), torch.cat([s.scales for s in shards]))
