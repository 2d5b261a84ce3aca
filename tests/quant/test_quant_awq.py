"""AWQ against RTN on a tiny model whose activations have a few large-magnitude channels, as real LLMs do."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import save_tiny_model

from perfxllm.model.loader import build_model, open_checkpoint
from perfxllm.quant.awq import AWQConfig, search_clip
from perfxllm.quant.block_runner import BlockRunner
from perfxllm.quant.pipeline import quantize_model
from perfxllm.quant.rtn import QuantSpec


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory):
    folder = save_tiny_model(
        tmp_path_factory.mktemp("awq") / "m", hidden_size=128, intermediate_size=256, num_key_value_heads=4
    )
    model = build_model(open_checkpoint(str(folder)), torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    for layer in model.layers:  # a few channels 20x larger at the input of every projection group
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[torch.randperm(128, generator=g)[:4]] *= 20
        layer.mlp.gate_up_proj.weight[256:][torch.randperm(256, generator=g)[:4]] *= 20  # up rows -> down
    return model


def block_output(model, layer, ids: torch.Tensor) -> torch.Tensor:
    runner = BlockRunner(model, ids.shape[0], ids.shape[1])
    runner.attach(layer)
    h = model.embed_tokens(ids.view(-1))
    return runner.map(lambda x, pos, meta: sum(layer(x, None, pos, model.cos_sin_cache, meta)), h)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8)])
def test_awq_beats_rtn_on_block_output(outlier_model, spec):
    g = torch.Generator().manual_seed(1)
    vocab = outlier_model.config.vocab_size
    calib = torch.randint(0, vocab, (8, 64), generator=g)
    held_out = torch.randint(0, vocab, (4, 64), generator=g)
    with torch.inference_mode():
        ref = block_output(outlier_model, outlier_model.layers[0], held_out)
        errors = {}
        for method in ("rtn", "awq"):
            model = copy.deepcopy(outlier_model)
            quantize_model(model, spec, method, calib.tolist(), progress=False)
            errors[method] = float((block_output(model, model.layers[0], held_out) - ref).pow(2).mean())
    assert errors["awq"] < 0.8 * errors["rtn"], errors


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8)])
def test_clip_search_minimises_the_output_error(spec):
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(8, 64, generator=g), torch.randn(300, 64, generator=g)
    x[:, :3] *= 10
    cfg = AWQConfig()
    lo, hi = search_clip(w, x, spec, cfg)

    def error(clip) -> torch.Tensor:  # per row and group, over the tokens directly
        gs = spec.group_size_for(64)
        d = (spec.fake(w, clip) - w).view(8, -1, gs)
        return torch.einsum("tgj,mgj->mtg", x.view(300, -1, gs), d).pow(2).mean(1)

    best = error((lo, hi))
    steps = [1 - i / cfg.clip_grid for i in range(int(cfg.max_shrink * cfg.clip_grid))]
    pairs = [(a, b) for a in steps for b in steps] if spec.bits == 4 else [(f, f) for f in steps]
    for pair in pairs:  # the best candidate for every group, measured over the tokens
        assert (best <= error(pair) * (1 + 1e-4) + 1e-9).all(), pair
