"""Round-to-nearest quantization while a checkpoint streams in (`--quantization int4|int8`): the decoder
projections arrive packed, so a model never needs its dense weights in memory all at once. For random-weight
models of real shapes and quick tries; AWQ needs calibration and runs offline in `perfxllm quantize`.
Embeddings, norms and lm_head stay dense, as `perfxllm quantize` leaves them."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from perfxllm.errors import PerfxError
from perfxllm.model.loader import Checkpoint
from perfxllm.quant.formats import Int4Weight, Int8Weight
from perfxllm.quant.rtn import QuantSpec

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHODS = {"int4": QuantSpec(bits=4, group_size=128), "int8": QuantSpec(bits=8)}


class QuantizeOnLoad:
    """ckpt's tensors, its projections quantized; refuses a model whose widths take no group of the method."""

    def __init__(self, ckpt: Checkpoint, method: str) -> None:
        if method not in METHODS:
            raise PerfxError(f"unknown --quantization {method!r} (choose from {', '.join(METHODS)})")
        self.source, self.spec = ckpt.source, METHODS[method]
        self.spec.check_fits(ckpt.config, ckpt.path)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor | Int4Weight | Int8Weight]]:
        for name, tensor in self.source.iter_tensors():
            module, _, attr = name.rpartition(".")
            if (
                attr == "weight"
                and module.rpartition(".")[2] in PROJECTIONS
                and isinstance(tensor, torch.Tensor)
            ):
                tensor = self.spec.quantize(tensor)
            yield name, tensor
