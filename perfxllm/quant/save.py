"""Write a quantized model as a Hugging Face-style folder that perfxllm loads directly: config.json with a
quantization_config, model.safetensors with the packed weights under the checkpoint's own (unfused) names,
each packed tensor named after its field in perfxllm.quant.formats (`...q_proj.qweight/.scales/.zeros`),
and the tokenizer and generation config."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from perfxllm.layers.linear import Linear, Weight, split_weight
from perfxllm.model.loader import Checkpoint
from perfxllm.quant.formats import tensor_fields

FORMAT_VERSION = 2  # 2: int4 zero points packed two per byte
DENSE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _shard_sizes(model: nn.Module) -> dict[str, list[int]]:
    cfg = model.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"qkv_proj": [q, kv, kv], "gate_up_proj": [cfg.intermediate_size] * 2}


def _hf_name(name: str) -> str:
    return name if name.startswith("lm_head") else f"model.{name}"


def module_key(hf_prefix: str) -> str:
    """ "model.layers.3.self_attn.q_proj" -> "self_attn.q_proj" (the name shared by every layer)."""
    return re.sub(r"^model\.(layers\.\d+\.)?", "", hf_prefix)


def checkpoint_tensors(model: nn.Module, dense_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """The model's weights under checkpoint names, and {module key: format name} of the packed ones."""
    shard_names: dict[str, list[str]] = {}
    for proj, (fused, _) in sorted(model.fused_shards.items(), key=lambda kv: kv[1]):
        shard_names.setdefault(fused, []).append(proj)
    sizes = _shard_sizes(model)
    tensors: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}

    def add(prefix: str, weight: Weight, bias: torch.Tensor | None) -> None:
        if isinstance(weight, torch.Tensor):
            tensors[f"{prefix}.weight"] = weight.to(dense_dtype)
        else:
            formats[module_key(prefix)] = weight.format_name
            tensors.update({f"{prefix}.{f}": getattr(weight, f) for f in tensor_fields(weight)})
        if bias is not None:
            tensors[f"{prefix}.bias"] = bias.to(dense_dtype)

    for name, mod in model.named_modules():
        if isinstance(mod, Linear):
            if name == "lm_head" and model.config.tie_word_embeddings:
                continue
            parent, _, leaf = name.rpartition(".")
            if leaf not in shard_names:
                add(_hf_name(name), mod.weight, mod.bias)
                continue
            weights = split_weight(mod.weight, sizes[leaf])
            biases = mod.bias.split(sizes[leaf]) if mod.bias is not None else [None] * len(weights)
            for proj, w, b in zip(shard_names[leaf], weights, biases):
                add(_hf_name(f"{parent}.{proj}"), w, b)
        else:
            for pname, p in mod.named_parameters(recurse=False):
                tensors[_hf_name(f"{name}.{pname}")] = p.to(dense_dtype)
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, formats


def save_quantized(model: nn.Module, ckpt: Checkpoint, out: Path, settings: dict[str, Any]) -> None:
    """settings: how it was quantized (method, bits, group_size, calibration...), kept in quantization_config."""
    hf_config: dict[str, Any] = dict(ckpt.config.hf_config)
    # Dense tensors keep the source's dtype (float16 when it says none, as GGUF files do).
    source_dtype = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float16")
    dense_dtype = DENSE_DTYPES.get(source_dtype.removeprefix("torch."), torch.float16)
    tensors, formats = checkpoint_tensors(model, dense_dtype)
    out.mkdir(parents=True, exist_ok=True)
    hf_config["torch_dtype"] = str(dense_dtype).removeprefix("torch.")
    hf_config.pop("dtype", None)
    hf_config["quantization_config"] = {
        "quant_method": "perfxllm",
        "format_version": FORMAT_VERSION,
        **settings,
        "modules": formats,  # packed projections (per layer) and their format; the rest is dense
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    ckpt.tokenizer.tok.save(str(out / "tokenizer.json"))
    tok_config = dict(getattr(ckpt.source, "tokenizer_config", {}))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    generation = Path(ckpt.path) / "generation_config.json"
    if generation.is_file():
        shutil.copy(generation, out / "generation_config.json")
    else:
        tok = ckpt.tokenizer
        gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_ids or None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
