"""Decode steps of a quantized model on the CPU in one C call (csrc/llama_decode.c): the CPU's counterpart of
the CUDA graphs. At one token a sequence the model's arithmetic is small, and dispatching its ~300 ops a
token from Python costs as much as the arithmetic itself; the C loop runs the same kernels in the same order.

It takes a Llama-family model whose every decoder projection is in the CPU kernels' layouts
(perfxllm.kernels.quant_matmul_cpu), with float32 activations and KV cache, and no tensor parallelism; other
models decode through the module tree as before. A dense lm_head is applied to the loop's hidden states in
torch (float32 GEMV is what torch does well).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from perfxllm.kernels import cpu_lib
from perfxllm.kernels.quant_matmul_cpu import X_BLOCKS, CPUInt4Weight, CPUInt8Weight
from perfxllm.layers.attention import block_table_tensor

_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
INT4_ZEROS, INT4_MINS, INT8 = 0, 1, 2


class QLinear(ctypes.Structure):
    _fields_ = [("qweight", _p), ("scales", _p), ("zeros", _p), ("bias", _p)] + [
        (f, _i64) for f in ("kind", "n", "k", "g", "xg")
    ]


class DecodeLayer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_norm", _p)] + [
        (f, QLinear) for f in ("qkv", "o", "gate_up", "down")
    ] + [("k_cache", _p), ("v_cache", _p)]  # fmt: skip


class DecodeModel(ctypes.Structure):
    _fields_ = [(f, _i64) for f in ("num_layers", "hidden", "inter", "hq", "hkv", "d", "block_size")] + [
        ("eps", _f32),
        ("scale", _f32),
        ("embed", _p),
        ("final_norm", _p),
        ("cos_sin", _p),
        ("layers", ctypes.POINTER(DecodeLayer)),
        ("lm_head", QLinear),
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _qlinear(module: nn.Module) -> QLinear:
    w = module.weight
    if isinstance(w, torch.Tensor):
        return QLinear()  # dense: no qweight
    n, k = w.shape
    if isinstance(w, CPUInt8Weight):
        g = w.group_size or k
        xg = next(b for b in X_BLOCKS if g % b == 0)
        return QLinear(_ptr(w.qweight), _ptr(w.scales), None, _ptr(module.bias), INT8, n, k, g, xg)
    kind = INT4_MINS if w.zeros.is_floating_point() else INT4_ZEROS
    return QLinear(
        _ptr(w.qweight), _ptr(w.scales), _ptr(w.zeros), _ptr(module.bias), kind, n, k, w.group_size, 0
    )


def supports(model: nn.Module) -> bool:
    projections = [m for layer in model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                           layer.mlp.gate_up_proj, layer.mlp.down_proj)]  # fmt: skip
    layer = model.layers[0]
    return (
        model.tp is None
        and cpu_lib.load() is not None
        and model.embed_tokens.weight.dtype == torch.float32
        and layer.self_attn.k_cache is not None
        and layer.self_attn.k_cache.dtype == torch.float32
        and all(isinstance(m.weight, CPUInt4Weight | CPUInt8Weight) for m in projections)
        and all(m.bias is None or m.bias.dtype == torch.float32 for m in projections)
    )


class CPUGraphRunner:
    def __init__(self, model: nn.Module, max_batch: int) -> None:
        cfg = model.config
        layers = model.layers
        self.layers = (DecodeLayer * len(layers))(
            *[
                DecodeLayer(
                    _ptr(layer.input_layernorm.weight),
                    _ptr(layer.post_attention_layernorm.weight),
                    _qlinear(layer.self_attn.qkv_proj),
                    _qlinear(layer.self_attn.o_proj),
                    _qlinear(layer.mlp.gate_up_proj),
                    _qlinear(layer.mlp.down_proj),
                    _ptr(layer.self_attn.k_cache),
                    _ptr(layer.self_attn.v_cache),
                )
                for layer in layers
            ]
        )
        attn = layers[0].self_attn
        self.model_struct = DecodeModel(
            len(layers), cfg.hidden_size, cfg.intermediate_size, attn.num_heads, attn.num_kv_heads,
            attn.head_dim, attn.k_cache.shape[1], layers[0].input_layernorm.eps, attn.scale,
            _ptr(model.embed_tokens.weight), _ptr(model.norm.weight), _ptr(model.cos_sin_cache),
            self.layers, _qlinear(model.lm_head),
        )  # fmt: skip
        self.model = model  # keeps every tensor the structures point at alive
        self.max_batch = max_batch
        self.packed_head = self.model_struct.lm_head.qweight is not None
        lib = cpu_lib.load()
        self._decode = lib.llama_decode
        self.work = torch.empty(lib.llama_decode_work_size(ctypes.byref(self.model_struct), max_batch))
        self.hidden = torch.empty(max_batch, cfg.hidden_size)
        self.logits = torch.empty(max_batch, model.lm_head.weight.shape[0] if self.packed_head else 0)

    def can_run(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch

    def run(
        self,
        input_ids: torch.Tensor,
        positions: list[int],
        slots: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """One decode token for each of B sequences -> logits float32 [B, vocab] (a view of a buffer that the
        next step overwrites)."""
        b = len(input_ids)
        tables = block_table_tensor(block_tables)
        pos, slot = torch.tensor([positions, slots], dtype=torch.int64)  # one allocation
        lens = torch.tensor(context_lens, dtype=torch.int32)
        self._decode(
            ctypes.byref(self.model_struct), b, input_ids.data_ptr(), pos.data_ptr(), slot.data_ptr(),
            tables.data_ptr(), tables.shape[1], lens.data_ptr(), self.work.data_ptr(), self.hidden.data_ptr(),
            self.logits.data_ptr(),
        )  # fmt: skip
        return self.logits[:b] if self.packed_head else self.model.compute_logits(self.hidden[:b])
