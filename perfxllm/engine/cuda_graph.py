"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once at start-up over
static input buffers. A step copies its inputs into the buffers' first rows and replays the smallest bucket
that holds its batch; the padding rows write no cache slot (slot -1) and their logits are ignored.

The graphs bake in the kernels' grids: decode attention's count of parts is fixed at capture (each part's
length is worked out on the GPU from the sequence's context) and the int4 matmuls use the block shapes tuned
during the warm-up run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from perfxllm.kernels._common import copy_to
from perfxllm.layers.attention import AttentionMetadata, block_table_tensor

# Batch sizes with a graph (and max_num_seqs): above 64 rows, padding is at most a fifth of a bucket, above
# 256 a ninth and above 512 (where the matmuls are bound by compute, so padding costs its share of the time)
# a seventeenth.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48)
BUCKETS += (*range(64, 128, 16), *range(128, 1025, 32))


def buckets_up_to(limit: int) -> list[int]:
    """The BUCKETS below limit, every 256 above the last of them, and limit."""
    return [b for b in BUCKETS if b < limit] + list(range(BUCKETS[-1] + 256, limit, 256)) + [limit]


def capture(
    buckets: list[int], forward: Callable[[int], torch.Tensor], device: torch.device
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """One graph of forward(bucket) per bucket, and the output tensors they write, sharing one memory pool."""
    graphs, outputs, pool = {}, {}, None
    for bucket in sorted(buckets, reverse=True):  # largest first, so the smaller graphs fit in its pool
        forward(bucket)  # warm-up: compiles and tunes the kernels outside the capture
        torch.cuda.synchronize(device)
        graphs[bucket] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[bucket], pool=pool):
            outputs[bucket] = forward(bucket)
        pool = graphs[bucket].pool()
    return graphs, outputs


class CUDAGraphRunner:
    def __init__(self, model: nn.Module, max_batch: int, max_model_len: int, block_size: int) -> None:
        device = model.cos_sin_cache.device
        self.model, self.max_model_len = model, max_model_len
        self.buckets = buckets_up_to(max_batch)
        n, max_blocks = self.buckets[-1], -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.graphs, self.logits = capture(self.buckets, self._forward, device)

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata(
            query_lens=[1] * b,
            context_lens=self.context_lens[:b],
            slot_mapping=self.slot_mapping[:b],
            block_tables=self.block_tables[:b],
            max_context_len=self.max_model_len,
        )
        hidden = self.model(self.input_ids[:b], self.positions[:b], meta)
        return self.model.compute_logits(hidden)

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def bucket(self, batch_size: int) -> int:
        """The smallest batch size with a graph that holds batch_size rows."""
        return next(x for x in self.buckets if x >= batch_size)

    def run(
        self,
        input_ids: torch.Tensor,
        positions: list[int],
        slots: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """One decode token for each of B sequences -> logits [B, vocab] (a view into the graph's
        output: read it before the next step)."""
        b = len(input_ids)
        bucket = self.bucket(b)
        self.input_ids[:b].copy_(input_ids)
        copy_to(self.positions[:b], positions)
        copy_to(self.slot_mapping[:b], slots)
        self.slot_mapping[b:bucket].fill_(-1)
        self.context_lens[b:bucket].fill_(1)
        copy_to(self.context_lens[:b], context_lens)
        tables = block_table_tensor(block_tables)
        copy_to(self.block_tables[:b, : tables.shape[1]], tables)
        self.graphs[bucket].replay()
        return self.logits[bucket][:b]
