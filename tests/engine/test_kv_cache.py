"""The KV cache's memory on the CPU: zeros that cost nothing until blocks are written."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from perfxllm.engine.kv_cache import zeros


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_zeros(dtype):
    t = zeros((3, 5, 16, 2, 8), dtype, torch.device("cpu"))
    assert t.shape == (3, 5, 16, 2, 8) and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros_like(t))
    t[1, 2] = 1.5
    assert t.sum().item() == 1.5 * 16 * 2 * 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_cpu_zeros_take_memory_only_where_written():
    """torch.zeros writes every page (a 1 GiB cache was 1 GiB of memory, and 0.3 s, at start)."""
    before = _rss_bytes()
    t = zeros((256, 2**20), torch.uint8, torch.device("cpu"))  # 256 MiB
    assert _rss_bytes() - before < 32 * 2**20
    t[:64] = 1  # 64 MiB written
    assert 48 * 2**20 < _rss_bytes() - before < 112 * 2**20
