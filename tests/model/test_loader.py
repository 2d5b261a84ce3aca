"""The loader: a q/k/v or gate/up projection of the wrong shape is named before the shards are stacked, and
the rotary table covers the positions a run uses, not the model's whole context."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TINY_CONFIG, save_tiny_model

from perfxllm.errors import ModelLoadError
from perfxllm.model.gguf_writer import write_gguf
from perfxllm.model.loader import build_model, open_checkpoint

CPU = torch.device("cpu")
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    **TINY_CONFIG,
    "num_hidden_layers": 1,
    "max_position_embeddings": 256,
}
UP = "model.layers.0.mlp.up_proj.weight"


def config_file(tmp_path: Path, **fields) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIG, **fields}))
    return str(path)


def load_error(path: Path, dequantize: bool = False) -> str:
    with pytest.raises(ModelLoadError) as e:
        build_model(open_checkpoint(str(path), dequantize=dequantize), CPU, torch.float32)
    return str(e.value)


def test_transposed_hf_projection_is_named(tmp_path: Path) -> None:
    folder = save_tiny_model(tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    weights[UP] = weights[UP].T.contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert load_error(folder) == f"{UP} has shape (64, 128), expected (128, 64)"


def gguf_with(tmp_path: Path, name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Path:
    """A random model written as Q4_0 GGUF, with the tensor `name` changed."""
    ckpt = open_checkpoint(None, config_file(tmp_path))
    tensors = {n: change(t) if n == name else t for n, t in ckpt.source.iter_tensors()}
    out = tmp_path / "m.gguf"
    write_gguf(dataclasses.replace(ckpt, source=SimpleNamespace(iter_tensors=tensors.items)), out)
    return out


@pytest.mark.parametrize("dequantize", [False, True], ids=["packed", "dequantized"])
def test_gguf_projection_of_the_wrong_shape_is_named(tmp_path: Path, dequantize: bool) -> None:
    path = gguf_with(tmp_path, UP, lambda t: t.T.contiguous())
    assert load_error(path, dequantize) == f"{UP} has shape (64, 128), expected (128, 64)"


def test_rotary_table_covers_the_positions_used(tmp_path: Path) -> None:
    ckpt = open_checkpoint(None, config_file(tmp_path, max_position_embeddings=2**22))
    assert build_model(ckpt, CPU, torch.float32).cos_sin_cache.shape == (8192, 16)
    assert build_model(ckpt, CPU, torch.float32, max_positions=10000).cos_sin_cache.shape == (10000, 16)


def test_config_far_larger_than_its_weights_fails_on_a_weight(tmp_path: Path) -> None:
    """A config.json whose sizes (each within its bound) describe a 4M x 128K embedding, over tiny weights:
    the first weight's shape is the error, before anything of the config's size is allocated (the embedding
    was: a 2 TB allocation and a torch traceback)."""
    folder = save_tiny_model(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    big = dict(
        vocab_size=2**22, hidden_size=2**17, num_attention_heads=1024, num_key_value_heads=1024, head_dim=64
    )
    (folder / "config.json").write_text(json.dumps({**config, **big}))
    assert "expected (4194304, 131072)" in load_error(folder)
