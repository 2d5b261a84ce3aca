"""The kernels' shared helpers: the tuner's per-process memory of its choices."""

from __future__ import annotations

from perfxllm.kernels._common import DiskTuner


def test_tuner_builds_the_candidates_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PERFXLLM_CACHE_DIR", str(tmp_path))
    tuner = DiskTuner("test")
    built = []

    def candidates(tag: str) -> list[dict]:
        built.append(tag)
        return [{"BLOCK": 16, "tag": tag}]  # one choice: nothing is timed, on any machine

    def run(cfg: dict) -> None:
        raise AssertionError("a one-choice pick times nothing")

    first = tuner.pick("a", lambda: candidates("a"), run)
    assert tuner.pick("a", lambda: candidates("a"), run) == first
    assert tuner.pick("b", lambda: candidates("b"), run) == {"BLOCK": 16, "tag": "b"}
    assert built == ["a", "b"]
