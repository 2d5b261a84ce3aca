"""The KV cache tensors: per layer, K and V of shape [num_blocks, block_size, num_kv_heads, head_dim],
allocated once and handed to the attention layers."""

from __future__ import annotations

import torch
from torch import nn

from perfxllm.model.config import ModelConfig


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * dtype.itemsize


class KVCache:
    def __init__(
        self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ):
        cfg: ModelConfig = model.config
        shape = (cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        for i, layer in enumerate(model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.k[i], self.v[i]
