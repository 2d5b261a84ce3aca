"""`perfxllm info MODEL`: what a model is and what it costs in memory."""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from perfxllm.errors import ModelLoadError
from perfxllm.layers.linear import Linear
from perfxllm.model.config import ModelConfig
from perfxllm.model.hf_loader import read_json
from perfxllm.model.loader import build_model, open_checkpoint, resolve_dtype
from perfxllm.model.random_weights import PRESETS
from perfxllm.model.registry import model_class
from perfxllm.quant.formats import map_tensors, tensor_fields
from perfxllm.quant.save import DENSE_DTYPES


def weight_bytes_by_format(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of weights per storage format, each tensor counted once (tied embeddings too)."""
    seen: set[int] = set()
    totals: dict[str, int] = defaultdict(int)

    def count(fmt: str, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                totals[fmt] += t.numel() * t.element_size()

    for mod in model.modules():
        w = mod.weight if isinstance(mod, Linear) else None
        if w is not None and not isinstance(w, torch.Tensor):  # packed, in any layout (spec or a kernel's)
            count(w.format_name, *(getattr(w, f) for f in tensor_fields(w)))
    for p in model.parameters():
        count(str(p.dtype).removeprefix("torch."), p)
    for mod in model.modules():
        if isinstance(mod, Linear):
            for t in (mod.weight, mod.bias):
                if isinstance(t, torch.Tensor):
                    count(str(t.dtype).removeprefix("torch."), t)
    return dict(totals)


def quant_label(model: torch.nn.Module, dtype: torch.dtype) -> str:
    """The packed weight formats (e.g. 'int4 g32'), or the dtype of a dense model."""
    packed = sorted(f for f in weight_bytes_by_format(model) if f not in DENSE_DTYPES)
    return "+".join(packed) or str(dtype).removeprefix("torch.")


def estimate_weight_bytes(config: ModelConfig) -> dict[str, dict[str, int]]:
    """Weight bytes by format of the model quantized each way (projections of the decoder layers; embeddings
    and norms fp16; lm_head fp16 unless tied, and int4 in the last variant), computed from the packed shapes
    that the quantizer itself produces on meta tensors: no memory, no weights."""
    from perfxllm.quant.rtn import QuantSpec

    variants = {"fp16": (None, False), "int8": (QuantSpec(8), False), "int4 g128": (QuantSpec(4, 128), False)}
    if not config.tie_word_embeddings:
        variants["int4 g128, lm_head int4"] = (QuantSpec(4, 128), True)
    out = {}
    for label, (spec, quantize_head) in variants.items():
        with torch.device("meta"):
            model = model_class(config.architecture)(config).to(torch.float16)
        packed = {}  # by shape: the layers repeat a few shapes, and quantizing even meta tensors takes ~20 ms
        for name, mod in model.named_modules():
            if not isinstance(mod, Linear) or (name == "lm_head" and config.tie_word_embeddings):
                continue
            w = torch.empty(mod.out_features, mod.in_features, dtype=torch.float16, device="meta")
            if spec is not None and (name != "lm_head" or quantize_head):
                if w.shape not in packed:
                    packed[w.shape] = spec.quantize(w)
                w = map_tensors(packed[w.shape], torch.empty_like)  # tensors of their own: each is counted
            mod.weight = w
        out[label] = weight_bytes_by_format(model)
    return out


def run_estimate(spec: str) -> int:
    path = Path(spec) / "config.json" if Path(spec).is_dir() else Path(spec)
    if spec in PRESETS:
        hf = PRESETS[spec]
    elif path.is_file():
        hf = read_json(path)
    else:
        raise ModelLoadError(
            f"--estimate takes a config.json, a model folder or one of: {', '.join(PRESETS)}"
        )
    cfg = ModelConfig.from_hf(hf, str(path))
    print(f"config        {spec}: {cfg.architecture}, {_parameter_count(cfg) / 1e9:.2f} B parameters")
    print(f"tied embeddings: {cfg.tie_word_embeddings}; embeddings and norms stay fp16 in every variant")
    for label, by_format in estimate_weight_bytes(cfg).items():
        total = sum(by_format.values())
        parts = ", ".join(f"{fmt} {n / 2**30:.2f}" for fmt, n in sorted(by_format.items()))
        print(f"{label:<24} {total / 2**30:6.2f} GiB  {total / 1e9:6.2f} GB   ({parts} GiB)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    if args.estimate:
        return run_estimate(args.estimate)
    ckpt = open_checkpoint(args.model, args.random_weights)
    cfg = ckpt.config
    device = torch.device("cpu")
    model = build_model(ckpt, device, resolve_dtype(args.dtype, device, cfg))
    by_format = weight_bytes_by_format(model)
    n_params = _parameter_count(cfg)
    print(f"model         {ckpt.path}")
    print(f"architecture  {cfg.architecture}")
    print(f"parameters    {n_params / 1e6:.1f} M")
    print(f"layers        {cfg.num_layers}, hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}")
    print(
        f"attention     {cfg.num_heads} heads, {cfg.num_kv_heads} KV heads, head_dim {cfg.head_dim}, rope_theta {cfg.rope_theta:g}"
    )
    print(
        f"context       {cfg.max_position_embeddings} tokens; vocabulary {cfg.vocab_size}; tied embeddings: {cfg.tie_word_embeddings}"
    )
    for fmt, n in sorted(by_format.items()):
        print(f"weights       {fmt:<10} {n / 2**20:10.1f} MiB")
    print(f"weights total {sum(by_format.values()) / 2**20:.1f} MiB (as loaded for the CPU)")
    return 0


def _parameter_count(cfg) -> int:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * d * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    per_layer = attn + 3 * h * i + 2 * h
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return cfg.num_layers * per_layer + embed + h
