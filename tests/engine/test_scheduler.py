"""Scheduler, driven directly: a step is simulated as Engine._postprocess does it."""

from __future__ import annotations

from perfxllm.engine.block_manager import BlockManager
from perfxllm.engine.scheduler import ScheduledBatch, Scheduler
from perfxllm.engine.sequence import Sequence, Status
from perfxllm.sampling_params import SamplingParams

BS = 4
NEXT_TOKEN = 1000  # every "sampled" token


def make(num_blocks: int = 64, max_num_seqs: int = 8, max_tokens: int = 64) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS), max_num_seqs, max_tokens)


def seq(rid: str, prompt_len: int, max_tokens: int = 4, first: int | None = None) -> Sequence:
    """Prompts of different sequences differ from the first token on (no prefix-cache hits) unless a
    first token is given."""
    first = 100 * (ord(rid[0]) - ord("a")) if first is None else first
    return Sequence(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens))


def run_step(sched: Scheduler, batch: ScheduledBatch) -> list[str]:
    """Engine._postprocess without a model: the ids of the sequences that sampled a token."""
    sampled = []
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        assert n > 0
        # The K/V slots this step writes must be backed by blocks.
        assert len(s.block_table) * BS >= s.num_computed_tokens + n
        s.num_computed_tokens += n
        sched.block_manager.register_full_blocks(s)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(NEXT_TOKEN)
            sampled.append(s.request_id)
            if len(s.output_ids) >= s.params.max_tokens:
                sched.finish(s, "length")
    return sampled


def plan(batch: ScheduledBatch | None) -> list[tuple[str, int]]:
    return [] if batch is None else [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]


def run_to_end(sched: Scheduler, max_steps: int = 500) -> list[list[tuple[str, int]]]:
    steps = []
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch is not None, "the scheduler stalled"
        assert batch.num_tokens <= sched.max_num_batched_tokens
        steps.append(plan(batch))
        run_step(sched, batch)
        assert len(steps) < max_steps
    return steps


def test_fcfs_order_and_full_prefill():
    sched = make()
    a, b, c = seq("a", 5), seq("b", 3), seq("c", 7)
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert plan(batch) == [("a", 5), ("b", 3), ("c", 7)]
    assert all(s.status is Status.RUNNING for s in (a, b, c))
    assert run_step(sched, batch) == ["a", "b", "c"]
    assert plan(sched.schedule()) == [("a", 1), ("b", 1), ("c", 1)]


def test_token_budget_blocks_later_arrivals():
    sched = make(max_tokens=10)
    sched.add(seq("a", 25))
    sched.add(seq("b", 3))
    steps = [plan(b) for b in iter_steps(sched, 3)]
    assert steps == [[("a", 10)], [("a", 10)], [("a", 5), ("b", 3)]]


def iter_steps(sched: Scheduler, n: int):
    for _ in range(n):
        batch = sched.schedule()
        yield batch
        run_step(sched, batch)


def test_chunked_prefill_mixes_with_decode_and_samples_only_at_the_end():
    sched = make(max_tokens=10)
    short, long = seq("short", 3), seq("long", 25)
    sched.add(short)
    sched.add(long)
    b1 = sched.schedule()
    assert plan(b1) == [("short", 3), ("long", 7)]
    assert run_step(sched, b1) == ["short"]  # the long prompt's first chunk samples nothing
    assert long.num_tokens == 25 and long.num_computed_tokens == 7
    b2 = sched.schedule()
    assert plan(b2) == [("short", 1), ("long", 9)]
    assert run_step(sched, b2) == ["short"]
    b3 = sched.schedule()
    assert plan(b3) == [("short", 1), ("long", 9)]
    assert run_step(sched, b3) == ["short", "long"]  # 7 + 9 + 9 = 25: the prompt is done and samples
    assert long.num_computed_tokens == 25 and long.output_ids == [NEXT_TOKEN]
    assert plan(sched.schedule()) == [("short", 1), ("long", 1)]


def test_max_num_seqs():
    sched = make(max_num_seqs=2)
    for rid in "abc":
        sched.add(seq(rid, 3, max_tokens=2))
    b1 = sched.schedule()
    assert plan(b1) == [("a", 3), ("b", 3)]
    run_step(sched, b1)
    assert plan(sched.schedule()) == [("a", 1), ("b", 1)]  # c waits: two are running
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_a_finished_sequence_makes_room_for_a_waiting_one():
    sched = make(max_num_seqs=2)
    for rid in "abc":
        sched.add(seq(rid, 3, max_tokens=2))
    steps = run_to_end(sched)
    assert steps == [
        [("a", 3), ("b", 3)],
        [("a", 1), ("b", 1)],  # each reaches max_tokens=2 and finishes
        [("c", 3)],
        [("c", 1)],
    ]
    assert sched.block_manager.num_free_blocks == 64


def test_finish_frees_blocks_and_removes_waiting():
    sched = make(num_blocks=10, max_num_seqs=1)
    a, b = seq("a", 9), seq("b", 5)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.block_manager.num_free_blocks == 10 - 3
    sched.finish(a, "abort")
    assert a.status is Status.FINISHED and a.finish_reason == "abort"
    assert sched.block_manager.num_free_blocks == 10 and a.block_table == []
    sched.finish(b, "abort")  # still waiting
    assert not sched.has_unfinished()
    assert sched.schedule() is None


def test_preemption_by_recompute():
    # 4 blocks of 4 tokens. a and b each hold 2 blocks after their 7-token prefills; at position 8 a needs
    # a third block: b, the later arrival, is preempted.
    sched = make(num_blocks=4, max_tokens=64)
    a, b = seq("a", 7, max_tokens=6), seq("b", 7, max_tokens=6, first=50)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())  # prefill: each samples its 8th token
    run_step(sched, sched.schedule())  # decode position 7 (still block 1): each has 9 tokens
    assert sched.block_manager.num_free_blocks == 0 and sched.num_preemptions == 0

    batch = sched.schedule()
    assert plan(batch) == [("a", 1)]
    assert sched.num_preemptions == 1
    assert b.status is Status.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and sched.running == [a]
    assert b.token_ids == [*range(50, 57), NEXT_TOKEN, NEXT_TOKEN]  # its output so far is kept
    assert len(a.block_table) == 3

    c = seq("c", 3, max_tokens=1, first=90)
    sched.add(c)  # arrives after the preemption: queues behind b
    assert list(sched.waiting) == [b, c]
    run_step(sched, batch)

    steps = run_to_end(sched)
    assert a.finish_reason == "length" and len(a.output_ids) == 6
    assert b.finish_reason == "length" and len(b.output_ids) == 6
    assert b.token_ids[:7] == list(range(50, 57)) and b.num_prompt_tokens == 7
    assert c.finish_reason == "length"
    first_b = next(i for i, s in enumerate(steps) if any(r == "b" for r, _ in s))
    first_c = next(i for i, s in enumerate(steps) if any(r == "c" for r, _ in s))
    assert first_b <= first_c
    assert sched.block_manager.num_free_blocks == 4


def test_preemption_picks_the_latest_arrival():
    sched = make(num_blocks=4, max_tokens=64)
    a, b, c = seq("a", 8, max_tokens=4), seq("b", 3, max_tokens=4, first=40), seq("c", 3, first=80)
    for s in (a, b, c):
        sched.add(s)
    run_step(sched, sched.schedule())  # a: 2 blocks, b: 1, c: 1; each has sampled one token
    assert sched.block_manager.num_free_blocks == 0
    # a needs a third block for position 8; b and c still fit in theirs. c, the latest, goes, not b.
    batch = sched.schedule()
    assert plan(batch) == [("a", 1), ("b", 1)]
    assert c.status is Status.WAITING and list(sched.waiting) == [c] and c.block_table == []
    assert b.status is Status.RUNNING
    run_step(sched, batch)
    run_to_end(sched)
    assert all(s.finish_reason == "length" for s in (a, b, c))


def test_preempted_sequence_is_recomputed_in_full():
    sched = make(num_blocks=4, max_tokens=64)
    a, b = seq("a", 7, max_tokens=3), seq("b", 7, max_tokens=3, first=50)
    sched.add(a)
    sched.add(b)
    run_step(sched, sched.schedule())
    run_step(sched, sched.schedule())
    run_step(sched, sched.schedule())  # b preempted, a finishes (3 tokens)
    assert a.status is Status.FINISHED and b.status is Status.WAITING
    batch = sched.schedule()
    # b comes back with all 9 of its tokens to compute, less what the prefix cache still holds of them.
    assert batch.seqs == [b]
    assert b.num_computed_tokens + batch.num_new_tokens[0] == 9
    # a's third block was the oldest free one: b's tail block. b's first block is still cached.
    assert b.num_cached_tokens == 4 and b.num_computed_tokens == 4


def test_preemption_in_the_middle_of_a_chunked_prefill():
    """b is preempted with 4 of its 16 prompt tokens computed: when it comes back, only those 4 may come
    from the prefix cache; the rest of its prompt was never computed."""
    sched = make(num_blocks=5, max_tokens=8)
    a, b = seq("a", 4, max_tokens=2), seq("b", 16)
    sched.add(a)
    sched.add(b)
    b1 = sched.schedule()
    assert plan(b1) == [("a", 4), ("b", 4)]
    run_step(sched, b1)
    b2 = sched.schedule()  # a's 5th token needs a block: b, mid-prefill, holds all the others
    assert plan(b2) == [("a", 1)] and b.status is Status.WAITING
    run_step(sched, b2)  # a finishes
    b3 = sched.schedule()
    assert b3.seqs == [b]
    assert b.num_cached_tokens == 4 and b.num_computed_tokens == 4
    assert b3.num_new_tokens == [8]
    run_to_end(sched)
    assert b.finish_reason == "length"
