"""Result files name the commit that made them."""

from __future__ import annotations

import subprocess

from perfxllm.bench import current_commit


def test_the_commit_variable_wins_over_the_checkout(monkeypatch):
    """The GPU machine runs a copy of the tree whose git state, if any, is not the commit under test."""
    monkeypatch.setenv("PERFXLLM_COMMIT", "abc123")
    assert current_commit() == "abc123"
    monkeypatch.delenv("PERFXLLM_COMMIT")
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert current_commit() == (head or None)
