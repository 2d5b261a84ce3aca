"""Turns a scheduled batch into tensors, runs the model, and returns the logits of the sequences that sample."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from perfxllm.engine.cpu_graph import CPUGraphRunner
from perfxllm.engine.cuda_graph import CUDAGraphRunner
from perfxllm.engine.sampler import SampledBatch
from perfxllm.engine.scheduler import ScheduledBatch
from perfxllm.engine.sequence import PENDING_TOKEN, Sequence
from perfxllm.kernels._common import to_device
from perfxllm.layers.attention import AttentionMetadata, block_table_tensor

if TYPE_CHECKING:
    from perfxllm.engine.mixed_graph import MixedGraphRunner
    from perfxllm.engine.tensor_parallel import TPGroup


@dataclass
class StepInputs:
    """One step's model inputs as plain lists: what the scheduler decided, in the form every tensor-parallel
    rank runs (rank 0 broadcasts it)."""

    input_ids: list[int]  # the new tokens of all sequences, back to back
    positions: list[int]
    slots: list[int]  # KV-cache slot of each new token
    query_lens: list[int]  # new tokens per sequence
    context_lens: list[int]  # tokens in the cache per sequence after this step
    block_tables: list[list[int]]
    logit_rows: list[int]  # the tokens whose next-token logits are wanted (each sampling sequence's last)
    # (index in input_ids, row of the previous step's draws) of each token still being drawn on the device
    pending: list[tuple[int, int]]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        block_size: int,
        device: torch.device,
        graphs: CUDAGraphRunner | CPUGraphRunner | None = None,
        tp: TPGroup | None = None,
        mixed_graphs: MixedGraphRunner | None = None,
        logit_sizes: list[int] | None = None,
    ) -> None:
        """logit_sizes: row counts (ascending) that the sampling rows of a step run outside the decode graphs
        are padded to for lm_head, each run once by warm_up_logits. On the GPU cuBLAS picks lm_head's kernel
        by the row count, and the first launch of a kernel not loaded yet (CUDA loads them lazily) waits for
        the GPU to drain: with a new count in most steps with prompt tokens, the host could not prepare the
        next step while the GPU ran this one. None: exactly the sampling rows."""
        self.model, self.block_size, self.device, self.graphs = model, block_size, device, graphs
        self.mixed_graphs = mixed_graphs  # steps with prompt tokens, on the GPU
        self.tp = tp  # set on rank 0 of a tensor-parallel group: it broadcasts each step to the others
        self.logit_sizes = logit_sizes

    def prepare(
        self, batch: ScheduledBatch, drawn: SampledBatch | None = None
    ) -> tuple[StepInputs, list[Sequence]]:
        """drawn: the previous step's draws, whose tokens (PENDING_TOKEN on the host) are inputs here."""
        # sequences with one new token first: the GPU attends to them with flash-decoding, to the rest with
        # prefill attention (AttentionMetadata.decode_rows)
        order = sorted(zip(batch.seqs, batch.num_new_tokens), key=lambda seq_n: seq_n[1] != 1)
        inputs = StepInputs([], [], [], [n for _, n in order], [], [], [], [])
        drawn_rows = {id(seq): i for i, seq in enumerate(drawn.seqs)} if drawn else {}
        sampling: list[Sequence] = []
        bs = self.block_size
        for seq, n in order:
            start = seq.num_computed_tokens
            inputs.input_ids += seq.token_ids[start : start + n]
            pos = range(start, start + n)
            inputs.positions += pos
            inputs.slots += [seq.block_table[p // bs] * bs + p % bs for p in pos]
            inputs.context_lens.append(start + n)
            inputs.block_tables.append(seq.block_table)
            if start + n == seq.num_tokens:
                if seq.token_ids[-1] == PENDING_TOKEN:
                    inputs.pending.append((len(inputs.input_ids) - 1, drawn_rows[id(seq)]))
                inputs.logit_rows.append(len(inputs.input_ids) - 1)
                sampling.append(seq)
        return inputs, sampling

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, drawn: SampledBatch | None = None
    ) -> tuple[torch.Tensor, list[Sequence]]:
        """Logits [S, vocab] in the model's dtype for the S sequences whose step ends on their last token
        (they sample). On the GPU the step is only launched: nothing here waits for the device."""
        inputs, sampling = self.prepare(batch, drawn)
        if self.tp is not None:  # the other ranks cannot see the draws: they get the tokens themselves
            tokens = drawn.tokens.tolist() if inputs.pending else []
            for i, row in inputs.pending:
                inputs.input_ids[i] = tokens[row]
            inputs.pending = []
            self.tp.broadcast(inputs)
        return self.execute(inputs, drawn.tokens if drawn else None), sampling

    @torch.inference_mode()
    def execute(self, inputs: StepInputs, drawn_tokens: torch.Tensor | None = None) -> torch.Tensor:
        ids = to_device(inputs.input_ids, self.device)
        if inputs.pending:
            index, rows = to_device(inputs.pending, self.device).unbind(1)
            ids[index] = drawn_tokens[rows]
        if self.graphs and max(inputs.query_lens) == 1 and self.graphs.can_run(len(inputs.query_lens)):
            logits = self.graphs.run(
                ids, inputs.positions, inputs.slots, inputs.context_lens, inputs.block_tables
            )
            # Every row samples unless a prompt chunk of one token is not its prompt's last: then select (a
            # copy of [rows, vocab] floats, 131 MB at 256 x 128256, that a full decode step does not need).
            return (
                logits
                if len(inputs.logit_rows) == len(logits)
                else logits[to_device(inputs.logit_rows, self.device)]
            )
        rows = len(inputs.logit_rows)
        padded = self._logit_size(rows)
        if self.mixed_graphs and self.mixed_graphs.can_run(len(inputs.input_ids), len(inputs.query_lens)):
            hidden = self.mixed_graphs.run(ids, inputs)[:padded]
        else:
            meta = AttentionMetadata(
                query_lens=inputs.query_lens,
                context_lens=to_device(inputs.context_lens, self.device, torch.int32),
                slot_mapping=to_device(inputs.slots, self.device),
                block_tables=block_table_tensor(inputs.block_tables, self.device),
                max_context_len=max(inputs.context_lens),
            )
            hidden = self.model(ids, to_device(inputs.positions, self.device), meta)
            logit_rows = inputs.logit_rows + inputs.logit_rows[:1] * (padded - rows)
            hidden = hidden[to_device(logit_rows, self.device)]
        return self.model.compute_logits(hidden)[:rows]

    def _logit_size(self, rows: int) -> int:
        """The row count lm_head runs at for `rows` sampling rows (see __init__). A start-up step can sample
        more rows than max_num_seqs: those are not padded."""
        sizes = self.logit_sizes or []
        i = bisect.bisect_left(sizes, rows)
        return sizes[i] if i < len(sizes) else rows

    def warm_up_steps(self, max_tokens: int, max_seqs: int, max_model_len: int) -> None:
        """Run the start-up steps of warm_up_token_counts, which write no cache slot."""
        graph_tokens = self.mixed_graphs.buckets[-1] if self.mixed_graphs else 0
        for num_tokens in warm_up_token_counts(max_tokens, graph_tokens):
            self.execute(warm_up_inputs(num_tokens, max_seqs, max_model_len, self.block_size))

    @torch.inference_mode()
    def warm_up_logits(self) -> None:
        """Run lm_head at every padded row count (see __init__), so no step loads its kernel."""
        if self.logit_sizes:
            norm = self.model.norm.weight
            hidden = norm.new_zeros(self.logit_sizes[-1], norm.shape[0])
            for size in self.logit_sizes:
                self.model.compute_logits(hidden[:size])


def warm_up_token_counts(max_tokens: int, graph_tokens: int) -> list[int]:
    """Token counts of the start-up steps, largest first: max_tokens, and each power of two between it and
    graph_tokens (the most a mixed-step graph holds; 0 without them: their capture runs the smaller counts).
    An int4 matmul tunes its blocks for each power of two of tokens it meets, and cuBLAS loads a kernel on
    its first use, waiting for the GPU to drain: both belong at start-up, not in a served step."""
    return [max_tokens] + [
        1 << i for i in reversed(range(max_tokens.bit_length())) if graph_tokens < 1 << i < max_tokens
    ]


def warm_up_inputs(num_tokens: int, max_seqs: int, max_model_len: int, block_size: int) -> StepInputs:
    """A step of num_tokens prompt tokens in prompts of about 256 (as many as max_seqs allows) that writes
    no cache slot: running it once at start-up moves the first-use costs of the largest steps (kernel
    variants, GEMM heuristics, activation memory) out of the first requests, as vLLM's profile run does."""
    num_seqs = max(min(max_seqs, -(-num_tokens // 256)), -(-num_tokens // (max_model_len - 1)))
    lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    inputs = StepInputs(
        input_ids=[0] * num_tokens,
        positions=[],
        slots=[-1] * num_tokens,
        query_lens=lens,
        context_lens=lens,
        block_tables=[],
        logit_rows=[],
        pending=[],
    )
    for n in lens:
        inputs.positions += range(n)
        inputs.block_tables.append([0] * -(-n // block_size))
        inputs.logit_rows.append(len(inputs.positions) - 1)
    return inputs


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
    return model.compute_logits(model(ids, torch.arange(len(token_ids), device=device), meta)).float()
