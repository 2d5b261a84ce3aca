"""`perfxllm info MODEL`: what a model is and what it costs in memory."""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from perfxllm.layers.linear import Linear
from perfxllm.model.loader import build_model, open_checkpoint, resolve_dtype
from perfxllm.quant.formats import Int4Weight, Int8Weight


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
        if isinstance(w, Int4Weight):
            count(f"int4 g{w.group_size}", w.qweight, w.scales, w.zeros)
        elif isinstance(w, Int8Weight):
            count("int8", w.qweight, w.scales)
    for p in model.parameters():
        count(str(p.dtype).removeprefix("torch."), p)
    for mod in model.modules():
        if isinstance(mod, Linear):
            for t in (mod.weight, mod.bias):
                if isinstance(t, torch.Tensor):
                    count(str(t.dtype).removeprefix("torch."), t)
    return dict(totals)


def run_info(args: argparse.Namespace) -> int:
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
