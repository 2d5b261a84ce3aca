"""The decode graphs' batch-size buckets (the graphs themselves need a GPU: tests/engine/test_cuda_path.py)."""

from __future__ import annotations

from perfxllm.engine.cuda_graph import BUCKETS, buckets_up_to


def test_buckets_pad_a_batch_by_at_most_a_fifth_above_64_a_ninth_above_256_a_seventeenth_above_512():
    assert list(BUCKETS) == sorted(set(BUCKETS)) and BUCKETS[0] == 1 and BUCKETS[-1] == 1024
    for batch in range(65, 1025):
        bucket = next(b for b in BUCKETS if b >= batch)
        assert bucket - batch <= bucket / (17 if batch > 512 else 9 if batch > 256 else 5), batch


def test_buckets_up_to_a_limit_end_at_it_and_step_by_256_above_1024():
    assert buckets_up_to(6) == [1, 2, 4, 6]
    assert buckets_up_to(1000)[-3:] == [960, 992, 1000]
    assert buckets_up_to(1024)[-2:] == [992, 1024]
    assert buckets_up_to(1600)[-4:] == [1024, 1280, 1536, 1600]
