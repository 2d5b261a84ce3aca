"""Quantize a loaded dense model in place: RTN (no data) or AWQ (calibration samples, layer by layer)."""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from perfxllm.quant.awq import AWQConfig, awq_layer, layer_projections
from perfxllm.quant.block_runner import BlockRunner
from perfxllm.quant.rtn import QuantSpec


@torch.inference_mode()
def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    method: str,
    samples: list[list[int]] | None = None,
    awq: AWQConfig | None = None,
    quantize_lm_head: bool = False,
    progress: bool = True,
) -> list[dict[str, tuple[float, float]]]:
    """Replaces the weights of every decoder-layer projection (and of an untied lm_head if asked) by packed
    ones. Embeddings, norms and a tied lm_head stay dense. Returns AWQ's per-layer (RTN loss, AWQ loss)."""
    stats: list[dict[str, tuple[float, float]]] = []
    bar = tqdm(model.layers, desc=f"{method} int{spec.bits}", unit="layer", disable=not progress)
    if method == "rtn":
        for layer in bar:
            for lin in layer_projections(layer).values():
                lin.weight = spec.quantize(lin.weight)
    elif method == "awq":
        if not samples:
            raise ValueError("AWQ needs calibration samples")
        runner = BlockRunner(model, len(samples), len(samples[0]))
        ids = torch.tensor(samples, device=model.cos_sin_cache.device).view(-1)
        h = model.embed_tokens(ids)
        for layer in bar:
            h, layer_stats = awq_layer(layer, runner, h, model.cos_sin_cache, spec, awq or AWQConfig())
            stats.append(layer_stats)
            rtn, ours = (sum(v[i] for v in layer_stats.values()) for i in (0, 1))
            bar.set_postfix_str(f"loss vs RTN {ours / rtn:.2f}")
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
    else:
        raise ValueError(f"unknown method {method!r}")
    if quantize_lm_head and not model.config.tie_word_embeddings:
        model.lm_head.weight = spec.quantize(model.lm_head.weight)
    return stats
