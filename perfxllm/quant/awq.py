"""AWQ: activation-aware weight quantization (Lin et al., 2023), one decoder layer at a time.

The few input channels that see large activations matter most, and a per-channel scale s protects them:
W x = (W diag(s)) (x / s), so quantizing W diag(s) instead of W keeps more precision in those channels,
while the division by s is folded into whatever produces x (an RMSNorm weight, or the rows of the
preceding projection). For each group of projections that share an input we search s = mean|x|^a over a
grid of a (optionally also AutoAWQ's "duo" s = mean|x|^a / mean|w|^(1-a)), keeping the one that minimises
the error of the group's output (the whole attention for q/k/v, the whole MLP for gate/up) after
quantization; no scaling at all is one of the candidates, so AWQ never does worse than RTN on the
calibration data. Then, per quantization group, we shrink the low and the high end of the range where that
lowers the error of the projection's output (not for q and k: the attention softmax amplifies their errors).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from perfxllm.layers.linear import Linear
from perfxllm.quant.block_runner import BlockRunner, ChunkFn
from perfxllm.quant.rtn import Clip, QuantSpec


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20
    scale_grids: tuple[str, ...] = ("plain",)  # "plain": s = mean|x|^a; "duo": / mean|w|^(1-a)
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5


@dataclass
class ScaleGroup:
    name: str
    linear: Linear  # the (fused) projection whose input channels get scaled
    x: torch.Tensor  # its calibration input [tokens, in_features]
    output: ChunkFn  # what the search compares, from a chunk of x, with linear's current weight
    fold: Callable[[torch.Tensor], None]  # divides the output of what produces x by s


def _divide_norm(norm: nn.Module) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        norm.weight.data = (norm.weight.float() / s).to(norm.weight.dtype)

    return fold


def _divide_rows(lin: Linear, rows: slice) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        lin.weight[rows] = (lin.weight[rows].float() / s.unsqueeze(1)).to(lin.weight.dtype)
        if lin.bias is not None:
            lin.bias[rows] = (lin.bias[rows].float() / s).to(lin.bias.dtype)

    return fold


def _candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, cfg: AWQConfig) -> Iterator[torch.Tensor]:
    for grid in cfg.scale_grids:
        for i in range(cfg.n_grid):
            a = i / cfg.n_grid
            if grid == "duo":
                s = x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)
            elif a == 0:
                continue  # no scaling, already the first candidate
            else:
                s = x_mean.pow(a)
            s = s.clamp(min=1e-4)
            yield s / (s.max() * s.min()).sqrt()


def search_scale(
    group: ScaleGroup, runner: BlockRunner, spec: QuantSpec, cfg: AWQConfig
) -> tuple[torch.Tensor, float, float]:
    """(best scales [in_features], its loss, the loss without scaling, i.e. RTN's)."""
    w = group.linear.weight
    wf = w.float()
    ref = runner.map(group.output, group.x)
    x_mean = torch.linalg.vector_norm(group.x, ord=1, dim=0, dtype=torch.float32) / group.x.shape[0]
    g = spec.group_size_for(wf.shape[1])
    w_abs = wf.abs().view(-1, g)
    w_mean = (w_abs / (w_abs.amax(1, keepdim=True) + 1e-6)).view_as(wf).mean(0)

    def loss_with(s: torch.Tensor) -> float:
        group.linear.weight = (spec.fake(wf * s) / s).to(w.dtype)
        return runner.mse(group.output, ref, group.x)

    best_s = torch.ones_like(x_mean)
    rtn_loss = best_loss = loss_with(best_s)
    for s in _candidate_scales(x_mean, w_mean, cfg):
        loss = loss_with(s)
        if loss < best_loss:
            best_s, best_loss = s, loss
    group.linear.weight = w
    return best_s, best_loss, rtn_loss


def search_clip(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, cfg: AWQConfig) -> Clip:
    """Per group, the factors in (1 - max_shrink, 1] on the low and the high end of the quantization range
    (one factor for int8's symmetric range) that minimise the error of the group's share of the output over
    all calibration tokens: two [M, K // G] tensors.

    That error is d C d^T for the weight error d of a group and its inputs' Gram matrix C = X^T X / T, so the
    tokens are summed once, not once per candidate."""
    m, k = w.shape
    g = spec.group_size_for(k)
    xg = x.view(-1, k // g, g)
    gram = torch.zeros(k // g, g, g, device=w.device)
    for chunk in xg.split(4096):
        chunk = chunk.float()
        gram += torch.einsum("tgi,tgj->gij", chunk, chunk)
    gram /= x.shape[0]
    wf = w.float()
    steps = [1 - i / cfg.clip_grid for i in range(int(cfg.max_shrink * cfg.clip_grid))]
    pairs = [(a, b) for a in steps for b in steps] if spec.bits == 4 else [(f, f) for f in steps]
    best_err = torch.full((m, k // g), torch.inf, device=w.device)
    lo, hi = torch.ones_like(best_err), torch.ones_like(best_err)
    for a, b in pairs:
        d = (spec.fake(wf, (a, b)) - wf).view(m, k // g, g)
        err = torch.einsum("mgi,gij,mgj->mg", d, gram, d)
        better = err < best_err
        best_err[better], lo[better], hi[better] = err[better], a, b
    return lo, hi


def layer_projections(layer: nn.Module) -> dict[str, Linear]:
    """A decoder layer's four (fused) projections by their scale-group name."""
    attn, mlp = layer.self_attn, layer.mlp
    return {"qkv": attn.qkv_proj, "o": attn.o_proj, "gate_up": mlp.gate_up_proj, "down": mlp.down_proj}


def _capture_inputs(layer: nn.Module, runner: BlockRunner, h: torch.Tensor, cos_sin: torch.Tensor):
    """Run the layer on h; return its output and the inputs of its four projections."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layer_projections(layer)}
    hooks = [
        lin.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0]))
        for name, lin in layer_projections(layer).items()
    ]
    try:
        out = runner.map(lambda x, pos, meta: sum(layer(x, None, pos, cos_sin, meta)), h)
    finally:
        for hook in hooks:
            hook.remove()
    return out, {name: torch.cat(xs) for name, xs in seen.items()}


def awq_layer(
    layer: nn.Module,
    runner: BlockRunner,
    h: torch.Tensor,
    cos_sin: torch.Tensor,
    spec: QuantSpec,
    cfg: AWQConfig,
) -> tuple[torch.Tensor, dict[str, tuple[float, float]]]:
    """Quantize one decoder layer in place. h: its input [tokens, hidden] over the calibration samples.
    Returns the layer's unquantized output (the next layer's calibration input, as AutoAWQ does; feeding the
    quantized output instead made no consistent difference on SmolLM2) and, per scale group, (RTN's loss, AWQ's loss)
    on the calibration data."""
    runner.attach(layer)
    attn, mlp = layer.self_attn, layer.mlp
    out, x = _capture_inputs(layer, runner, h, cos_sin)
    v_rows = slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)
    up_rows = slice(mlp.down_proj.in_features, 2 * mlp.down_proj.in_features)
    groups = [
        ScaleGroup(
            "qkv",
            attn.qkv_proj,
            x["qkv"],
            lambda t, pos, meta: attn(t, pos, cos_sin, meta),
            _divide_norm(layer.input_layernorm),
        ),
        ScaleGroup(
            "gate_up",
            mlp.gate_up_proj,
            x["gate_up"],
            lambda t, pos, meta: mlp(t),
            _divide_norm(layer.post_attention_layernorm),
        ),
        ScaleGroup(
            "down",
            mlp.down_proj,
            x["down"],
            lambda t, pos, meta: mlp.down_proj(t),
            _divide_rows(mlp.gate_up_proj, up_rows),
        ),
    ]
    # v feeds o_proj directly only when there is one v head per query head (no GQA), as AutoAWQ checks.
    if attn.num_kv_heads == attn.num_heads:
        groups.append(
            ScaleGroup(
                "o",
                attn.o_proj,
                x["o"],
                lambda t, pos, meta: attn.o_proj(t),
                _divide_rows(attn.qkv_proj, v_rows),
            )
        )

    stats, scales = {}, []
    for group in groups:
        s, loss, rtn_loss = search_scale(group, runner, spec, cfg)
        scales.append(s)
        stats[group.name] = (rtn_loss, loss)
    for group, s in zip(groups, scales):
        group.fold(s)
        group.linear.weight = (group.linear.weight.float() * s).to(group.linear.weight.dtype)
        x[group.name] = group.x / s.to(group.x.dtype)

    for name, lin in layer_projections(layer).items():
        w = lin.weight
        clip = torch.ones(2, w.shape[0], w.shape[1] // spec.group_size_for(w.shape[1]), device=w.device)
        if cfg.clip:
            rows = v_rows if name == "qkv" else slice(None)
            clip[0, rows], clip[1, rows] = search_clip(w[rows], x[name], spec, cfg)
        lin.weight = spec.quantize(w, (clip[0], clip[1]))
    return out, stats
