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

from perfxllm.errors import ModelLoadError


def _read_json(path: Path, required: bool = True) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ModelLoadError(f"{path.parent} has no {path.name}")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


class HFFolder:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.config = _read_json(self.folder / "config.json")
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.files = sorted({self.folder / f for f in _read_json(index).get("weight_map", {}).values()})
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
        self.tokenizer_config = _read_json(self.folder / "tokenizer_config.json", required=False)
        generation = _read_json(self.folder / "generation_config.json", required=False)
        eos = generation.get("eos_token_id")
        if eos is not None:
            self.tokenizer_config.setdefault("eos_token_ids", [eos] if isinstance(eos, int) else list(eos))
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
