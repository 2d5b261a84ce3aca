"""Load a GGUF file (llama.cpp's format) as what a Hugging Face folder gives: a config.json-style dict, a
tokenizer, a tokenizer_config.json-style dict and dequantized tensors under Hugging Face names."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers
import torch
from gguf import GGMLQuantizationType

from perfxllm.errors import ModelLoadError, UnsupportedError
from perfxllm.model.config import checked_size
from perfxllm.model.gguf_reader import GGUFFile, GGUFTensor, meta_array, meta_value
from perfxllm.model.gguf_tokenizer import build_tokenizer, build_tokenizer_config

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF hyper-parameter (after "{arch}.") -> the config.json size it gives
_SIZES = {
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "context_length": "max_position_embeddings",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_CONTEXT = 8192


@dataclass
class GGUFCheckpoint:
    path: str
    config: dict[str, Any]
    tokenizer: tokenizers.Tokenizer
    tokenizer_config: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(repr=False)  # Hugging Face name -> the file's tensor

    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def raw_tensor(self, hf_name: str) -> GGUFTensor:
        """The tensor as stored: quantized, and for Llama's q/k_proj in llama.cpp's row order (see rope_row_order)."""
        if hf_name not in self.tensors:
            raise ModelLoadError(f"{self.path} has no tensor {hf_name!r}")
        return self.tensors[hf_name]

    def rope_row_order(self, hf_name: str) -> np.ndarray | None:
        """llama.cpp's converter interleaves the two rotary halves of each Llama q/k head; with these row
        indices, raw[order] is back in Hugging Face's rotate_half layout. None for tensors left as they were."""
        heads = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}
        module = hf_name.rsplit(".", 1)[0].split(".", 3)[-1]
        if self.config["model_type"] != "llama" or module not in heads:
            return None
        n_heads, head_dim = self.config[heads[module]], self.config["head_dim"]
        rows = int(self.raw_tensor(hf_name).shape[-1])
        if rows != n_heads * head_dim:
            raise ModelLoadError(f"{hf_name} has {rows} rows, expected {n_heads} heads of {head_dim}")
        return rope_row_order(n_heads, rows)

    def tensor(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized, [out_features, in_features] as in Hugging Face."""
        t = self.raw_tensor(hf_name)
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        order = self.rope_row_order(hf_name)
        if order is not None:
            values = values[order]
        elif not values.flags.writeable:  # a view of the read-only memory map
            values = values.copy()
        return torch.from_numpy(values).to(dtype)

    def iter_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            yield name, self.tensor(name, dtype)


def rope_row_order(n_heads: int, rows: int) -> np.ndarray:
    """Row indices that take a q/k weight from llama.cpp's rotary order to Hugging Face's: stored row
    h*d + 2i + k holds Hugging Face row h*d + k*d/2 + i (head h, pair i, half k)."""
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(0, 2, 1).reshape(-1)


def load_gguf(path: str) -> GGUFCheckpoint:
    reader = _open(path)
    meta = reader.fields
    arch = meta_value(meta, "general.architecture", str)
    if arch not in _ARCHITECTURES:
        raise UnsupportedError(f"unsupported architecture {arch!r} (supported: {', '.join(_ARCHITECTURES)})")
    tensors = _hf_tensors(path, reader, arch)
    rope_freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    config = _config(meta, arch, tensors, rope_freqs)
    return GGUFCheckpoint(str(path), config, build_tokenizer(meta), build_tokenizer_config(meta), tensors)


def _open(path: str) -> GGUFFile:
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFFile(p)
    except (
        ValueError,
        struct.error,
        OverflowError,
        MemoryError,
    ) as e:  # a short file shows up as any of these
        raise ModelLoadError(
            f"{path}: cannot read the GGUF file, it is truncated or corrupt ({_one_line(e)})"
        ) from None
    size = p.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise ModelLoadError(f"{path} is truncated: tensor {t.name!r} runs past the end of the file")
    return reader


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _hf_tensors(path: str, reader: GGUFFile, arch: str) -> dict[str, GGUFTensor]:
    tensors = {}
    for t in reader.tensors:
        if t.name == _ROPE_FREQS or t.name.endswith(".attn_rot_embd"):
            continue  # rotary tables, computed by the engine
        m = _LAYER_TENSOR.fullmatch(t.name)
        if t.name in GLOBAL_NAMES:
            name = GLOBAL_NAMES[t.name]
        elif m and m[2] in LAYER_NAMES:
            name = f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.{m[3]}"
        else:
            raise UnsupportedError(f"{path}: unsupported tensor {t.name!r} for architecture {arch!r}")
        if not _dequantizable(t.tensor_type):
            raise UnsupportedError(f"{path}: tensor {t.name!r} has the unsupported type {t.tensor_type.name}")
        tensors[name] = t
    return tensors


@cache
def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)  # one block of zeros
    except NotImplementedError:
        return False
    return True


def _config(
    meta: dict[str, Any], arch: str, tensors: dict[str, GGUFTensor], rope_freqs: GGUFTensor | None
) -> dict[str, Any]:
    def size(name: str, default: int | None = None) -> int:
        key = f"{arch}.{name}"
        value = meta.get(key, default)
        if value is None:
            raise ModelLoadError(f"the GGUF metadata lacks {key}")
        return checked_size(value, _SIZES[name], f"GGUF metadata {key}")

    def number(name: str, default: float) -> float:
        return _f32(meta_value(meta, f"{arch}.{name}", float, default))

    hidden, heads, layers = size("embedding_length"), size("attention.head_count"), size("block_count")
    _check_block_count(f"{arch}.block_count", layers, tensors)
    head_dim = size("attention.key_length", hidden // heads)
    rope_dims = meta_value(meta, f"{arch}.rope.dimension_count", int, head_dim)
    if rope_dims != head_dim:
        raise UnsupportedError(f"partial rotary embeddings (rope.dimension_count {rope_dims})")
    theta = number("rope.freq_base", 10000.0)
    return {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": _vocab_size(meta, tensors),
        "hidden_size": hidden,
        "intermediate_size": size("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": size("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "max_position_embeddings": size("context_length", 4096),
        "rms_norm_eps": number("attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, arch, rope_freqs, head_dim, theta),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": arch == "qwen2" or "model.layers.0.self_attn.q_proj.bias" in tensors,
        "bos_token_id": meta_value(meta, "tokenizer.ggml.bos_token_id", int),
        "eos_token_id": meta_value(meta, "tokenizer.ggml.eos_token_id", int),
    }


def _check_block_count(key: str, count: int, tensors: dict[str, GGUFTensor]) -> None:
    """The file has the tensors of blocks 0 to count - 1 and of no others (checked before count layers are
    built), unless it has no tensors at all: llama.cpp's vocabulary-only files."""
    if not tensors:
        return
    blocks = {name.split(".")[2] for name in tensors if name.startswith("model.layers.")}
    expected = {str(i) for i in range(count)}
    if lacking := sorted(expected - blocks, key=int):
        raise ModelLoadError(
            f"GGUF metadata {key} is {count}, but the file has no blk.{lacking[0]} tensors ({len(blocks)} blocks in all)"
        )
    if stray := sorted(blocks - expected):
        raise ModelLoadError(f"GGUF metadata {key} is {count}, but the file has blk.{stray[0]} tensors")


def _vocab_size(meta: dict[str, Any], tensors: dict[str, GGUFTensor]) -> int:
    embed = tensors.get("model.embed_tokens.weight")
    return int(embed.shape[-1]) if embed is not None else len(meta_array(meta, "tokenizer.ggml.tokens", str))


def _f32(x: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.999999747378752e-06. Give the shortest decimal instead."""
    return float(str(np.float32(x)))


def _rope_scaling(
    meta: dict[str, Any], arch: str, rope_freqs: GGUFTensor | None, head_dim: int, theta: float
) -> dict[str, Any] | None:
    if rope_freqs is not None:
        factors = gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type).astype(np.float64)
        return _llama3_scaling(factors.reshape(-1), head_dim, theta)
    kind = meta_value(meta, f"{arch}.rope.scaling.type", str)
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": _f32(meta_value(meta, f"{arch}.rope.scaling.factor", float, 1.0))}
    context = meta_value(meta, f"{arch}.rope.scaling.original_context_length", int)
    if context is not None:
        scaling["original_max_position_embeddings"] = context
    return scaling


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """llama.cpp keeps Llama 3's rope scaling only as the divisor of each frequency (rope_freqs.weight).
    Between the two cut-off wavelengths the divisor is 1 / ((1 - s) / factor + s), with s linear in
    1 / wavelength; fitting that line gives the frequency factors. Only their ratios to the original context
    length show, so that is taken to be Llama 3's 8192."""
    factor = float(factors.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    if len(factors) != len(wavelen):
        raise ModelLoadError(f"rope_freqs.weight has {len(factors)} values for a head size of {head_dim}")
    medium = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    low, high = 1.0, 4.0
    if medium.sum() >= 2:
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)
        low = round(float(-intercept * _LLAMA3_CONTEXT / slope), 4)
        high = round(low + float(_LLAMA3_CONTEXT / slope), 4)
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": _LLAMA3_CONTEXT,
    }
    if not np.allclose(_llama3_factors(wavelen, scaling), factors, rtol=1e-3):
        raise UnsupportedError("rope_freqs.weight holds rope scaling that is not Llama 3's")
    return scaling


def _llama3_factors(wavelen: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    context, factor = s["original_max_position_embeddings"], s["factor"]
    smooth = (context / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(
        wavelen < context / s["high_freq_factor"],
        1.0,
        np.where(wavelen > context / s["low_freq_factor"], factor, medium),
    )
