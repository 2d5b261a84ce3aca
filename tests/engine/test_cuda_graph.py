"""The decode graphs' batch-size buckets (the graphs themselves need a GPU: tests/engine/test_cuda_path.py)."""

from __future__ import annotations

from perfxllm.engine.cuda_graph import BUCKETS


def test_buckets_pad_a_batch_by_at_most_a_fifth_above_64_a_ninth_above_256_a_seventeenth_above_512():
    assert list(BUCKETS) == sorted(set(BUCKETS)) and BUCKETS[0] == 1 and BUCKETS[-1] == 1024
    for batch in range(65, 1025):
        bucket = next(b for b in BUCKETS if b >= batch)
        assert bucket - batch <= bucket / (17 if batch > 512 else 9 if batch > 256 else 5), batch
