"""Continuous batching at token granularity.

Each step takes, first come first served, the running sequences (one token each when decoding, the next
chunk of a prompt when prefilling) and then waiting ones, within a token budget and a cap on running
sequences. A long prompt is prefilled in chunks across steps, mixed with other sequences' decode tokens.
When the KV cache is out of blocks, the most recently arrived running sequence is preempted: its blocks are
freed and it waits to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from perfxllm.engine.block_manager import BlockManager
from perfxllm.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # per sequence, tokens to run this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []

        running = deque(sorted(self.running, key=lambda s: s.seq_no))
        while running and budget > 0:
            seq = running.popleft()
            if seq.num_tokens >= seq.max_num_tokens:  # its last token is in flight (Engine.step)
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.block_manager.can_append(seq, n):
                victim = running.pop() if running else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.append(seq, n)
                seqs.append(seq)
                counts.append(n)
                budget -= n

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n

        return ScheduledBatch(seqs, counts) if seqs else None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
