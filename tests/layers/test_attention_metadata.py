"""The host-side helpers that turn a step's block tables into a tensor."""

from __future__ import annotations

import random

import torch

from perfxllm.layers.attention import block_table_tensor


def test_block_table_tensor_pads_ragged_tables_with_block_0():
    rng = random.Random(0)
    tables = [[rng.randrange(1, 10**6) for _ in range(rng.randrange(1, 40))] for _ in range(300)]
    width = max(map(len, tables))
    got = block_table_tensor(tables)
    assert got.dtype == torch.int32 and got.device.type == "cpu"
    assert got.tolist() == [t + [0] * (width - len(t)) for t in tables]
