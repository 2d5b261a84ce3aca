"""A Hugging Face model folder: config.json, *.safetensors (one file or shards listed in an index),
tokenizer.json, tokenizer_config.json and generation_config.json. Only safetensors are read: a pickled
checkpoint (*.bin) could run code on load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import SafetensorError, safe_open

from perfxllm.errors import ModelLoadError, shown
from perfxllm.model.config import token_ids


def read_json(path: Path, required: bool = True) -> dict[str, Any]:
    """A JSON file that holds an object ({} for an absent file that is not required)."""
    if not path.exists():
        if required:
            raise ModelLoadError(f"{path.parent} has no {path.name}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ModelLoadError(f"{path} is not valid JSON: it nests too deeply") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} holds {shown(data)}, not a JSON object")
    return data


def _weight_files(index: Path) -> list[Path]:
    weight_map = read_json(index).get("weight_map", {})
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ModelLoadError(f"{index}: weight_map is not an object of tensor name -> file name")
    return sorted({index.parent / f for f in weight_map.values()})


class HFFolder:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.config = read_json(self.folder / "config.json")
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.files = _weight_files(index)
        else:
            self.files = sorted(self.folder.glob("*.safetensors"))
        if not self.files:
            hint = (
                " (only pickled *.bin weights, which perfxllm does not load)"
                if any(self.folder.glob("*.bin"))
                else ""
            )
            raise ModelLoadError(f"{self.folder} has no *.safetensors weights{hint}")
        for f in self.files:
            if not f.exists():
                raise ModelLoadError(f"{f} is listed in the safetensors index but missing")
        self.tokenizer_config = read_json(self.folder / "tokenizer_config.json", required=False)
        generation = self.folder / "generation_config.json"
        eos = read_json(generation, required=False).get("eos_token_id")
        if eos is not None:
            self.tokenizer_config.setdefault("eos_token_ids", token_ids(eos, f"{generation}: eos_token_id"))
        tok_file = self.folder / "tokenizer.json"
        if not tok_file.exists():
            raise ModelLoadError(f"{self.folder} has no tokenizer.json")
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ModelLoadError(f"{tok_file} could not be read: {e}") from None

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for f in self.files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                        yield name, st.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise ModelLoadError(f"{f} is corrupt or truncated: {e}") from None
