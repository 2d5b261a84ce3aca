"""Runs parts of one decoder layer over every calibration token: a few samples at a time, each sample a
sequence of its own with causal attention over a small KV cache that belongs to the quantizer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from perfxllm.layers.attention import AttentionMetadata

# fn(x_chunk, ..., positions, meta) -> output chunk
ChunkFn = Callable[..., torch.Tensor]


class BlockRunner:
    def __init__(self, model: nn.Module, n_samples: int, seq_len: int, chunk_tokens: int = 4096) -> None:
        cfg = model.config
        self.model, self.n_samples, self.seq_len = model, n_samples, seq_len
        self.batch = max(1, min(n_samples, chunk_tokens // seq_len))
        device, dtype = model.cos_sin_cache.device, model.embed_tokens.weight.dtype
        # One cache block per sample: block b holds sample b of the chunk.
        shape = (self.batch, seq_len, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def attach(self, layer: nn.Module) -> None:
        layer.self_attn.k_cache, layer.self_attn.v_cache = self.k_cache, self.v_cache

    def _meta(self, b: int) -> tuple[torch.Tensor, AttentionMetadata]:
        device, n = self.k_cache.device, self.seq_len
        meta = AttentionMetadata(
            query_lens=[n] * b,
            context_lens=torch.full((b,), n, dtype=torch.int32, device=device),
            slot_mapping=torch.arange(b * n, device=device),
            block_tables=torch.arange(b, dtype=torch.int32, device=device).view(b, 1),
            max_context_len=n,
        )
        return torch.arange(n, device=device).repeat(b), meta

    def _chunks(self, *inputs: torch.Tensor):
        for start in range(0, self.n_samples, self.batch):
            b = min(self.batch, self.n_samples - start)
            rows = slice(start * self.seq_len, (start + b) * self.seq_len)
            yield rows, [x[rows] for x in inputs], *self._meta(b)

    def map(self, fn: ChunkFn, *inputs: torch.Tensor) -> torch.Tensor:
        """fn over the token-major inputs [n_samples * seq_len, ...], chunk by chunk, outputs concatenated."""
        return torch.cat([fn(*xs, pos, meta) for _, xs, pos, meta in self._chunks(*inputs)])

    def mse(self, fn: ChunkFn, ref: torch.Tensor, *inputs: torch.Tensor) -> float:
        """Mean squared difference between fn's outputs and ref, without keeping the outputs."""
        total = 0.0
        for rows, xs, pos, meta in self._chunks(*inputs):
            total += float((fn(*xs, pos, meta).float() - ref[rows].float()).pow(2).sum())
        return total / ref.numel()
