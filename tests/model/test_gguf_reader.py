"""The GGUF reader refuses a corrupt tensor directory or data alignment with one clear line."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from perfxllm.errors import ModelLoadError
from perfxllm.model.gguf_loader import load_gguf


def two_tensors(writer: gguf.GGUFWriter) -> None:
    """An F32 tensor and a Q4_0 one, both of 2 rows of 64 values."""
    values = np.ones((2, 64), np.float32)
    writer.add_tensor("token_embd.weight", values)
    writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(values, Q.Q4_0), raw_dtype=Q.Q4_0)


def load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as e:
        load_gguf(str(path))
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("name", "new_info", "needle"),
    [
        ("token_embd.weight", struct.pack("<I", 0), "has 0 dimensions (GGUF allows 1 to 4)"),
        ("token_embd.weight", struct.pack("<I5Q", 5, 64, 2, 1, 1, 1), "has 5 dimensions"),
        ("token_embd.weight", struct.pack("<IQQ", 2, 64, 0), "has an empty dimension: [64, 0]"),
        # 65 values were read as 2 blocks of 32, the 65th dropped without a word
        ("blk.0.ffn_up.weight", struct.pack("<IQQ", 2, 65, 2), "rows of 65 values, not whole Q4_0 blocks"),
    ],
    ids=["no dimensions", "5 dimensions", "empty dimension", "part of a block"],
)
def test_corrupt_tensor_shape(tmp_path: Path, write_gguf, patch_gguf, name, new_info, needle) -> None:
    path = write_gguf(tmp_path / "t.gguf", fill=two_tensors)
    patch_gguf(path, name, struct.pack("<IQQ", 2, 64, 2), new_info)
    message = load_error(path)
    assert repr(name) in message and needle in message


@pytest.mark.parametrize(
    ("add", "needle"),
    [
        (lambda w: w.add_uint32("general.alignment", 0), "general.alignment is 0, not a positive integer"),
        (
            lambda w: w.add_array("general.alignment", [32]),
            "general.alignment is [32], not a positive integer",
        ),
    ],
    ids=["zero", "an array"],
)
def test_bad_alignment(tmp_path: Path, write_gguf, add, needle) -> None:
    path = write_gguf(tmp_path / "a.gguf", fill=lambda w: (add(w), two_tensors(w)))
    assert needle in load_error(path)
