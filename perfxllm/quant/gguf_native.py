"""GGUF Q4_0 / Q4_1 / Q8_0 matrices imported as packed weights, bit for bit, without dequantizing.

A GGUF matrix [M, K] is M rows of K // 32 blocks; per block (little-endian):
    Q4_0: d fp16, 16 bytes: byte j holds element j (low nibble) and j + 16 (high);  w = (q - 8) * d
    Q4_1: d fp16, m fp16, 16 bytes as Q4_0;                                          w = q * d + m
    Q8_0: d fp16, 32 int8;                                                           w = q * d
so Q4_0 is Int4Weight with zero point 8, Q4_1 is Int4Weight with float16 "min" zeros, and Q8_0 is the grouped
Int8Weight (group 32): Int8Weight per output channel would need one scale per row, which Q8_0's per-block
scales are not, so the spec carries the grouped variant instead of a lossy conversion.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType

from perfxllm.layers.linear import Weight, select_rows
from perfxllm.model.gguf_loader import GGUFCheckpoint
from perfxllm.model.gguf_reader import GGUFTensor
from perfxllm.quant.formats import Int4Weight, Int8Weight, pack_int4

BLOCK = 32
NATIVE_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0)


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> [...] float16."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[M, blocks, 16] bytes in GGUF's order -> [M, blocks * 32] int4 values in element order."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(qs.shape[0], -1)


def import_gguf_matrix(t: GGUFTensor) -> Int4Weight | Int8Weight:
    """A Q4_0 / Q4_1 / Q8_0 tensor of shape [M, K] (GGUF writes it [K, M]) as a packed weight."""
    if t.tensor_type not in NATIVE_TYPES or len(t.shape) != 2:
        raise ValueError(f"{t.name}: {t.tensor_type.name} {list(t.shape)} is not a Q4_0/Q4_1/Q8_0 matrix")
    k, m = int(t.shape[0]), int(t.shape[1])
    blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8)).view(m, k // BLOCK, -1)
    d = _fp16(blocks[..., 0:2])
    if t.tensor_type == GGMLQuantizationType.Q8_0:
        return Int8Weight(blocks[..., 2:].contiguous().view(torch.int8).reshape(m, k), d, BLOCK)
    if t.tensor_type == GGMLQuantizationType.Q4_0:
        zeros = pack_int4(torch.full_like(d, 8, dtype=torch.uint8))
        return Int4Weight(pack_int4(_nibbles(blocks[..., 2:])), d, zeros, BLOCK)
    return Int4Weight(pack_int4(_nibbles(blocks[..., 4:])), d, _fp16(blocks[..., 2:4]), BLOCK)


class NativeGGUF:
    """A GGUFCheckpoint whose Q4_0 / Q4_1 / Q8_0 projections come packed (Q and K rows put back in Hugging
    Face's order, packed rows being whole rows), the embedding too (the loader gathers it dequantized, and a
    tied lm_head keeps it packed), and every other tensor dequantized, as the checkpoint gives it."""

    def __init__(self, source: GGUFCheckpoint) -> None:
        self.source = source
        self.config, self.tokenizer, self.tokenizer_config = (
            source.config,
            source.tokenizer,
            source.tokenizer_config,
        )

    def iter_tensors(self) -> Iterator[tuple[str, Weight]]:
        for name in self.source.tensor_names():
            raw = self.source.raw_tensor(name)
            matrix = name.endswith("_proj.weight") or name in ("lm_head.weight", "model.embed_tokens.weight")
            if not matrix or raw.tensor_type not in NATIVE_TYPES or len(raw.shape) != 2:
                yield name, self.source.tensor(name)
                continue
            weight = import_gguf_matrix(raw)
            order = self.source.rope_row_order(name)
            yield name, weight if order is None else select_rows(weight, torch.from_numpy(order))
