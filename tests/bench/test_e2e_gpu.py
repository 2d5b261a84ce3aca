"""perfxllm bench e2e --device cuda: what can be checked without a GPU."""

from perfxllm.cli import main


def test_batch_sizes_must_be_positive(capsys, tmp_path):
    assert main(["bench", "e2e", "--device", "cuda", "--batch", "1", "0", "--out-dir", str(tmp_path)]) == 2
    assert "--batch takes sizes of at least 1, got 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
