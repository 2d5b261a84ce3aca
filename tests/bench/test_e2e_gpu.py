"""perfxllm bench e2e --device cuda: what can be checked without a GPU."""

import pytest

from perfxllm.bench.e2e_gpu import engine_batches
from perfxllm.cli import main


def test_batch_sizes_must_be_positive(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "e2e", "--device", "cuda", "--batch", "1", "0", "--out-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "argument --batch: must be at least 1, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_engine_batches():
    assert engine_batches([1], sweep=False) == [(1,)]
    assert engine_batches([32, 16, 32], sweep=False) == [(16, 32)]
    assert engine_batches([1, 8], sweep=True) == [(1,), (2, 4, 8, 16, 32, 64)]
