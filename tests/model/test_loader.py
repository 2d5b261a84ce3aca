"""The loader: the rotary table covers the positions a run uses, not the model's whole context."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from perfxllm.model.loader import build_model, open_checkpoint

CPU = torch.device("cpu")
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def config_file(tmp_path: Path, **fields) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIG, **fields}))
    return str(path)


def test_rotary_table_covers_the_positions_used(tmp_path: Path) -> None:
    ckpt = open_checkpoint(None, config_file(tmp_path, max_position_embeddings=2**22))
    assert build_model(ckpt, CPU, torch.float32).cos_sin_cache.shape == (8192, 16)
    assert build_model(ckpt, CPU, torch.float32, max_positions=10000).cos_sin_cache.shape == (10000, 16)
