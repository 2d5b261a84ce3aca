"""Turns a scheduled batch into tensors, runs the model, and returns the logits of the sequences that sample."""

from __future__ import annotations

import torch
from torch import nn

from perfxllm.engine.cuda_graph import CUDAGraphRunner
from perfxllm.engine.scheduler import ScheduledBatch
from perfxllm.engine.sequence import Sequence
from perfxllm.layers.attention import AttentionMetadata


class ModelRunner:
    def __init__(
        self, model: nn.Module, block_size: int, device: torch.device, graphs: CUDAGraphRunner | None = None
    ) -> None:
        self.model, self.block_size, self.device, self.graphs = model, block_size, device, graphs

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        context_lens: list[int] = []
        last_token_index: list[int] = []
        bs = self.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + n]
            pos = range(start, start + n)
            positions += pos
            slots += [seq.block_table[p // bs] * bs + p % bs for p in pos]
            context_lens.append(start + n)
            last_token_index.append(len(input_ids) - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in batch.seqs]
        to = dict(device=self.device)
        meta = AttentionMetadata(
            query_lens=list(batch.num_new_tokens),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, **to),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, **to),
            block_tables=torch.tensor(tables, dtype=torch.int32, **to),
            max_context_len=max(context_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, **to)
        return ids, torch.tensor(positions, dtype=torch.int64, **to), meta, last_token_index

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence]]:
        """Logits float32 [S, vocab] for the S sequences whose step ends on their last token (they sample)."""
        sampling = [
            i
            for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
            if s.num_computed_tokens + n == s.num_tokens
        ]
        if self.graphs and max(batch.num_new_tokens) == 1 and self.graphs.can_run(len(batch.seqs)):
            logits = self._run_graph(batch.seqs)
            return logits[sampling], [batch.seqs[i] for i in sampling]
        ids, positions, meta, last = self.prepare(batch)
        hidden = self.model(ids, positions, meta)
        logits = self.model.compute_logits(hidden[[last[i] for i in sampling]])
        return logits, [batch.seqs[i] for i in sampling]

    def _run_graph(self, seqs: list[Sequence]) -> torch.Tensor:
        bs = self.block_size
        positions = [s.num_computed_tokens for s in seqs]
        return self.graphs.run(
            [s.token_ids[p] for s, p in zip(seqs, positions)],
            positions,
            [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, positions)],
            [p + 1 for p in positions],
            [s.block_table for s in seqs],
        )


@torch.inference_mode()
def prompt_logits(model: nn.Module, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """float32 logits [T, vocab] at every position of one sequence, with a KV cache of its own: for
    perplexity and for checks against a reference model. It points the model's attention at that cache, so
    it is not for a model that an Engine is serving."""
    from perfxllm.engine.kv_cache import KVCache

    device = model.cos_sin_cache.device
    num_blocks = -(-len(token_ids) // block_size)
    KVCache(model, num_blocks, block_size, model.embed_tokens.weight.dtype, device)
    meta = AttentionMetadata(
        query_lens=[len(token_ids)],
        context_lens=torch.tensor([len(token_ids)], dtype=torch.int32, device=device),
        slot_mapping=torch.arange(len(token_ids), device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device).view(1, -1),
        max_context_len=len(token_ids),
    )
    ids = torch.tensor(token_ids, device=device)
    return model.compute_logits(model(ids, torch.arange(len(token_ids), device=device), meta))
