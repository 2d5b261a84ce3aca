"""Steps with prompt tokens (a prefill, or prompt chunks beside decodes) replayed from CUDA graphs: one graph
per token-count bucket up to MAX_TOKENS, over static buffers sized for the largest bucket and batch.

Run eagerly, such a step costs the host about as much as the GPU (some 350 kernel launches for 32 layers,
each behind Python), so a step of a few hundred tokens waited on its launches. The graph holds one grid for
any batch that fits: flash-decoding over the bucket's first min(max_seqs, tokens) rows, where rows that are
not decodes have context 0 and are skipped, and prefill attention over a tile table padded with empty
tiles. Padding tokens write no cache slot (slot -1). The graph ends at the hidden states of the sampling
rows; lm_head runs after it (ModelRunner.execute).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from perfxllm.engine.cuda_graph import capture as capture_graphs
from perfxllm.engine.model_runner import StepInputs
from perfxllm.kernels._common import copy_to
from perfxllm.layers.attention import AttentionMetadata, PrefillLayout, block_table_tensor, leading_decodes

BUCKETS = (64, 128, 256, 384, 512, 768, 1024)
DECODE_PARTS = 16


class MixedGraphRunner:
    def __init__(
        self,
        model: nn.Module,
        max_seqs: int,
        max_tokens: int,
        max_model_len: int,
        block_size: int,
        capture: bool = True,
    ) -> None:
        """capture=False runs the same static-buffer forward eagerly, without graphs (tests on the CPU)."""
        from perfxllm.kernels.paged_decode_attention import max_partitions
        from perfxllm.kernels.rope_attention_prefill import prefill_config

        device = model.cos_sin_cache.device
        self.model, self.max_seqs, self.max_model_len = model, max_seqs, max_model_len
        self.buckets = sorted({t for t in BUCKETS if t < max_tokens} | {min(max_tokens, BUCKETS[-1])})
        t, b = self.buckets[-1], max_seqs
        self.block_q = prefill_config().block_q
        # Sized for the grid's rows, flash-decoding would give a few long-context decodes one part each; a
        # graph's rows are mostly empty, so split every context into up to DECODE_PARTS instead.
        config = model.config
        self.decode_partitions = min(DECODE_PARTS, max_partitions(config.num_heads, config.num_kv_heads))
        ints = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=device)
        self.positions = torch.zeros(t, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(b, **ints)  # a decode row's context; 0 for every other row
        self.block_tables = torch.zeros(b, -(-max_model_len // block_size), **ints)
        self.cu_seqlens = torch.zeros(b + 1, **ints)
        self.cached_lens = torch.zeros(b, **ints)
        self.tiles = torch.full((self._tile_slots(t), 2), -1, **ints)
        self.logit_rows = torch.zeros(b, dtype=torch.int64, device=device)
        self.graphs, self.hidden = (
            capture_graphs(self.buckets, self._forward, device) if capture else ({}, {})
        )

    def _tile_slots(self, tokens: int) -> int:
        """Query tiles a step of `tokens` tokens can need: each sequence adds at most one partial tile."""
        return -(-tokens // self.block_q) + min(self.max_seqs, tokens)

    def _forward(self, bucket: int) -> torch.Tensor:
        meta = AttentionMetadata(
            query_lens=[],
            context_lens=self.context_lens,
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables,
            max_context_len=self.max_model_len,
            decode_rows=min(self.max_seqs, bucket),
            decode_partitions=self.decode_partitions,
            prefill=PrefillLayout(self.cu_seqlens, self.cached_lens, self.tiles[: self._tile_slots(bucket)]),
        )
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], meta)
        return hidden[self.logit_rows]

    def can_run(self, num_tokens: int, num_seqs: int) -> bool:
        return num_tokens <= self.buckets[-1] and num_seqs <= self.max_seqs

    def run(self, input_ids: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """The hidden states [max_seqs, hidden] of the step's S = len(inputs.logit_rows) sampling rows, then
        of the first token's row (padding); input_ids on the device."""
        from perfxllm.kernels.rope_attention_prefill import prefill_tiles

        t, lens = len(inputs.input_ids), inputs.query_lens
        bucket = next(x for x in self.buckets if x >= t)
        decodes = leading_decodes(lens)
        pad_seqs = [0] * (self.max_seqs - len(lens))
        cu = [0, *itertools.accumulate(lens)]
        self.input_ids[:t].copy_(input_ids)
        copies = [
            (self.positions[:t], inputs.positions),
            (self.slot_mapping[:t], inputs.slots),
            (self.context_lens, inputs.context_lens[:decodes] + [0] * (self.max_seqs - decodes)),
            (self.cu_seqlens[: len(cu)], cu),
            (self.cached_lens, [c - n for c, n in zip(inputs.context_lens, lens)] + pad_seqs),
            (
                self.tiles[: self._tile_slots(bucket)].view(-1),
                prefill_tiles(lens, decodes, self._tile_slots(bucket)),
            ),
            (self.logit_rows, inputs.logit_rows + [0] * (self.max_seqs - len(inputs.logit_rows))),
        ]
        for dest, values in copies:
            copy_to(dest, values)
        self.slot_mapping[t:bucket].fill_(-1)
        tables = block_table_tensor(inputs.block_tables)
        copy_to(self.block_tables[: len(lens), : tables.shape[1]], tables)
        if self.graphs:
            self.graphs[bucket].replay()
            return self.hidden[bucket]
        return self._forward(bucket)
