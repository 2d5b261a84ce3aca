"""The paged KV cache's bookkeeping: fixed-size blocks, a block table per sequence, and prefix caching.

A full block is identified by the hash of its tokens chained with its predecessor's hash, so equal hashes
mean equal prefixes. Freed blocks keep their hash and their K/V until they are handed out again (the free
queue is oldest first), so a later request with the same prefix can still find them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from perfxllm.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default=())


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self.hash_to_block: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # full prompt blocks looked up
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1 - self.num_free_blocks / len(self.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _new_block(self) -> Block:
        """The oldest free block, its cached prefix (if any) forgotten."""
        block = self.blocks[self.free_blocks.popitem(last=False)[0]]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block.block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block

    def _share_block(self, block_id: int) -> Block:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1
        return block

    def _register(self, block: Block, h: int, tokens: tuple[int, ...]) -> None:
        block.hash, block.token_ids = h, tokens
        self.hash_to_block.setdefault(h, block.block_id)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq.num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing cached full blocks of its prefix."""
        assert not seq.block_table
        prev_hash, hitting = None, self.enable_prefix_caching
        for i in range(self.blocks_needed(seq.num_tokens)):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            full = len(tokens) == self.block_size and self.enable_prefix_caching
            h = hash((prev_hash, tokens)) if full else None
            cached = self.hash_to_block.get(h) if hitting and full else None
            self.prefix_queries += full
            if cached is not None and self.blocks[cached].token_ids == tokens:
                self.prefix_hits += 1
                block = self._share_block(cached)
                seq.num_cached_tokens += self.block_size
            else:
                # Hashed only once its K/V are written (register_full_blocks): a sequence preempted or
                # aborted mid-prefill must not leave uncomputed blocks behind as cached.
                hitting = False
                block = self._new_block()
            seq.block_table.append(block.block_id)
            prev_hash = h
        # The last prompt token is always recomputed: its logits are needed to sample.
        seq.num_computed_tokens = min(seq.num_cached_tokens, seq.num_tokens - 1)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        extra = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return extra <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for the K/V of seq's next num_new_tokens tokens."""
        while len(seq.block_table) < self.blocks_needed(seq.num_computed_tokens + num_new_tokens):
            seq.block_table.append(self._new_block().block_id)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: hash the blocks it filled, so that later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        # A sequence's hashed blocks are a prefix of its table (cached ones, then those filled and hashed in
        # order; a block of a running sequence keeps its hash): only the full blocks after them are new.
        full = seq.num_computed_tokens // self.block_size
        first = full
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
            first -= 1
        prev_hash = self.blocks[seq.block_table[first - 1]].hash if first else None
        for i in range(first, full):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            self._register(block, hash((prev_hash, tokens)), tokens)
            prev_hash = block.hash

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # the tail goes back first, so it is evicted first
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
