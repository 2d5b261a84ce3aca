"""BlockManager: allocation, reference counts, prefix caching and its eviction order."""

from __future__ import annotations

import pytest

from perfxllm.engine.block_manager import BlockManager
from perfxllm.engine.sequence import Sequence
from perfxllm.sampling_params import SamplingParams

BS = 4


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams())


def compute_all(bm: BlockManager, s: Sequence) -> None:
    """What a step that runs all of s's tokens leaves behind (Engine._postprocess)."""
    s.num_computed_tokens = s.num_tokens
    bm.register_full_blocks(s)


def test_allocate_and_free_counts():
    bm = BlockManager(10, BS)
    a = seq(list(range(10)))  # 2 full blocks and one partial
    assert bm.can_allocate(a)
    bm.allocate(a)
    assert len(a.block_table) == 3 and len(set(a.block_table)) == 3
    assert bm.num_free_blocks == 7
    assert all(bm.blocks[b].ref_count == 1 for b in a.block_table)
    assert a.num_cached_tokens == 0 and a.num_computed_tokens == 0
    assert bm.usage == pytest.approx(0.3)

    bm.free(a)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_can_allocate_counts_blocks():
    bm = BlockManager(3, BS)
    assert bm.can_allocate(seq(list(range(12))))
    assert not bm.can_allocate(seq(list(range(13))))
    bm.allocate(seq(list(range(5)), "a"))
    assert not bm.can_allocate(seq([100 + i for i in range(5)], "b"))
    assert bm.can_allocate(seq([100 + i for i in range(4)], "c"))


def test_append_grows_block_table_only_at_block_boundaries():
    bm = BlockManager(4, BS)
    s = seq([1, 2, 3])
    bm.allocate(s)
    compute_all(bm, s)
    s.token_ids.append(4)
    assert bm.can_append(s, 1)
    bm.append(s, 1)  # position 3 still fits in block 0
    assert len(s.block_table) == 1
    s.num_computed_tokens += 1
    s.token_ids.append(5)
    bm.append(s, 1)  # position 4 needs a second block
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    assert bm.can_append(s, 12) and not bm.can_append(s, 13)  # 4 computed + 12 = 4 blocks = 2 held + 2 free


def test_second_sequence_reuses_cached_full_blocks():
    bm = BlockManager(10, BS)
    a = seq(list(range(10)), "a")
    bm.allocate(a)
    compute_all(bm, a)
    b = seq([*range(8), 77, 78, 79], "b")  # same first 2 full blocks, then differs
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert bm.prefix_hits == 2
    assert bm.prefix_queries == 4  # 2 full blocks of a, 2 of b (b's third block is partial)
    assert bm.num_free_blocks == 10 - 4

    # Freeing one holder of a shared block keeps it allocated for the other.
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    assert bm.num_free_blocks == 10 - 3
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_a_differing_token_breaks_the_chain_at_its_block():
    bm = BlockManager(10, BS)
    base = list(range(12))  # 3 full blocks
    a = seq(base, "a")
    bm.allocate(a)
    compute_all(bm, a)
    changed = list(base)
    changed[5] = 99  # in block 1; block 2's tokens are equal but follow a different prefix
    b = seq(changed, "b")
    bm.allocate(b)
    assert b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 4 and b.num_computed_tokens == 4
    assert bm.prefix_hits == 1


def test_first_block_differs_means_no_hit():
    bm = BlockManager(10, BS)
    a = seq(list(range(8)), "a")
    bm.allocate(a)
    compute_all(bm, a)
    b = seq([42, *range(1, 8)], "b")
    bm.allocate(b)
    assert set(b.block_table).isdisjoint(a.block_table)
    assert b.num_cached_tokens == 0 and b.num_computed_tokens == 0


def test_whole_prompt_cached_recomputes_the_last_token():
    bm = BlockManager(10, BS)
    a = seq(list(range(8)), "a")
    bm.allocate(a)
    compute_all(bm, a)
    b = seq(list(range(8)), "b")
    bm.allocate(b)
    assert b.block_table == a.block_table
    assert b.num_cached_tokens == 8
    assert b.num_computed_tokens == 7 and b.num_uncomputed == 1


def test_partial_last_block_is_never_shared():
    bm = BlockManager(10, BS)
    a = seq(list(range(6)), "a")
    bm.allocate(a)
    compute_all(bm, a)
    b = seq(list(range(6)), "b")
    bm.allocate(b)
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    assert b.num_cached_tokens == 4 and b.num_computed_tokens == 4


def test_prefix_caching_disabled():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a = seq(list(range(8)), "a")
    bm.allocate(a)
    compute_all(bm, a)
    b = seq(list(range(8)), "b")
    bm.allocate(b)
    assert set(b.block_table).isdisjoint(a.block_table)
    assert b.num_cached_tokens == 0 and bm.prefix_hits == 0 and bm.prefix_queries == 0


def test_freed_blocks_keep_their_hash_until_reused_oldest_first():
    bm = BlockManager(6, BS)
    a = seq(list(range(12)), "a")  # 3 full blocks: takes blocks 0, 1, 2
    bm.allocate(a)
    compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 6

    # Still cached after being freed.
    again = seq(list(range(12)), "again")
    bm.allocate(again)
    assert again.block_table == a_blocks and again.num_cached_tokens == 12
    bm.free(again)

    # Never-used blocks go out before freed cached ones.
    c = seq([100 + i for i in range(12)], "c")
    bm.allocate(c)
    assert set(c.block_table).isdisjoint(a_blocks)
    bm.free(c)

    # Next come a's blocks, tail first (freed first): its first two blocks stay cached.
    d = seq([200, 201, 202], "d")
    bm.allocate(d)
    assert d.block_table == [a_blocks[2]]
    b = seq(list(range(12)), "b")
    bm.allocate(b)
    assert b.block_table[:2] == a_blocks[:2] and b.block_table[2] != a_blocks[2]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8


def test_evicted_block_is_forgotten():
    bm = BlockManager(2, BS)
    a = seq(list(range(4)), "a")
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    c = seq([9, 9, 9, 9, 9, 9, 9, 9], "c")  # takes both blocks, overwriting a's
    bm.allocate(c)
    bm.free(c)
    b = seq(list(range(4)), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and b.num_computed_tokens == 0


def test_register_full_blocks_after_decode_makes_generated_blocks_reusable():
    bm = BlockManager(10, BS)
    a = seq([1, 2, 3, 4, 5, 6], "a")
    bm.allocate(a)
    a.num_computed_tokens = 6  # prefill
    bm.register_full_blocks(a)
    a.token_ids.append(7)
    for token in (8, 9):  # two decode steps, each computing the last token and sampling the next
        bm.append(a, 1)
        a.num_computed_tokens += 1
        bm.register_full_blocks(a)
        a.token_ids.append(token)
    assert a.num_computed_tokens == 8 and a.token_ids == [1, 2, 3, 4, 5, 6, 7, 8, 9]

    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 50], "b")  # block 1 holds generated tokens 7 and 8
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8


def test_registering_as_blocks_fill_equals_registering_all_at_once():
    """register_full_blocks looks only at the blocks filled since it last ran: after a cached prefix, a
    chunked prefill and decode steps, every full block has the hash that hashing the whole sequence gives."""
    bm = BlockManager(20, BS)
    a = seq(list(range(9)), "a")
    bm.allocate(a)
    compute_all(bm, a)  # caches blocks [0..3] and [4..7]
    b = seq([*range(8), 50, 51, 52, 53, 54, 55, 56], "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 8
    b.num_computed_tokens += 5  # a prefill chunk that fills one more block and part of the next
    bm.register_full_blocks(b)
    b.num_computed_tokens = b.num_tokens
    bm.register_full_blocks(b)
    for token in range(60, 75):
        b.token_ids.append(token)
        bm.append(b, 1)
        b.num_computed_tokens += 1
        bm.register_full_blocks(b)
    prev = None
    for i in range(b.num_computed_tokens // BS):
        tokens = tuple(b.token_ids[i * BS : (i + 1) * BS])
        prev = hash((prev, tokens))
        block = bm.blocks[b.block_table[i]]
        assert (block.hash, block.token_ids) == (prev, tokens)
    assert bm.blocks[b.block_table[-1]].hash is None  # the partial last block


def test_only_computed_blocks_are_reusable_after_a_partial_prefill():
    """A sequence preempted or aborted in the middle of a chunked prefill: blocks whose K/V were never
    written must not be handed to a later sequence (or to it again) as cached."""
    bm = BlockManager(10, BS)
    a = seq(list(range(12)), "a")
    bm.allocate(a)
    a.num_computed_tokens = 4  # first chunk only
    bm.register_full_blocks(a)
    bm.free(a)
    b = seq(list(range(12)), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.num_computed_tokens == 4
