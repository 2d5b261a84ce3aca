"""A Hugging Face folder whose JSON files have the wrong shape or types: one clear line naming the file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

from perfxllm.errors import ModelLoadError
from perfxllm.model.loader import open_checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("hf") / "m")


@pytest.mark.parametrize(
    ("file", "content", "needle"),
    [
        ("config.json", "[1]", "config.json holds [1], not a JSON object"),
        ("config.json", "null", "config.json holds None, not a JSON object"),
        ("config.json", "[" * 100_000 + "]" * 100_000, "config.json is not valid JSON: it nests too deeply"),
        ("tokenizer_config.json", "[1]", "tokenizer_config.json holds [1], not a JSON object"),
        ("generation_config.json", "[1]", "generation_config.json holds [1], not a JSON object"),
        (
            INDEX,
            '{"weight_map": ["model.safetensors"]}',
            "weight_map is not an object of tensor name -> file",
        ),
        (
            INDEX,
            '{"weight_map": {"lm_head.weight": 1}}',
            "weight_map is not an object of tensor name -> file",
        ),
        ("tokenizer_config.json", '{"bos_token": 5}', "bos_token is 5, not a string"),
        ("generation_config.json", '{"eos_token_id": "x"}', "eos_token_id is 'x', not a token id"),
        ("generation_config.json", '{"eos_token_id": [2, "x"]}', "eos_token_id is [2, 'x'], not a token id"),
    ],
    ids=[
        "config array",
        "config null",
        "config nested",
        "tokenizer_config array",
        "generation_config array",
        "weight_map array",
        "weight_map of numbers",
        "bos_token number",
        "eos string",
        "eos mixed",
    ],
)
def test_json_of_the_wrong_shape(saved: Path, tmp_path: Path, file: str, content: str, needle: str) -> None:
    folder = shutil.copytree(saved, tmp_path / "m")
    (folder / file).write_text(content)
    with pytest.raises(ModelLoadError) as e:
        open_checkpoint(str(folder))
    message = str(e.value)
    assert file in message and needle in message and "\n" not in message


def test_tokenizer_config_eos_ids_are_checked(saved: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(saved, tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token_ids": ["<|im_end|>"]}))
    with pytest.raises(ModelLoadError, match=re.escape("eos_token_ids is ['<|im_end|>'], not a token id")):
        open_checkpoint(str(folder))
