"""Load a Hugging Face folder whose config.json has a quantization_config: perfxllm's own packed format
(written by `perfxllm quantize`) or an AutoAWQ GEMM checkpoint. Every check fails with a ModelLoadError
that names the tensor or the setting."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from perfxllm.errors import ModelLoadError
from perfxllm.layers.linear import Weight
from perfxllm.model.hf_loader import HFFolder
from perfxllm.quant.autoawq import AWQ_FIELDS, from_autoawq
from perfxllm.quant.formats import INT4_GROUP_SIZES, Int4Weight, Int8Weight
from perfxllm.quant.save import FORMAT_VERSION, module_key

PACKED_FIELDS = ("qweight", "scales", "zeros")


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _from_perfxllm(name: str, parts: dict[str, torch.Tensor]) -> Weight:
    q, scales = parts["qweight"], parts["scales"]
    if q.dim() != 2 or q.dtype not in (torch.uint8, torch.int8):
        raise ModelLoadError(f"{name}.qweight is {_describe(q)}: expected a uint8 (int4) or int8 matrix")
    m, k = q.shape[0], q.shape[1] * (2 if q.dtype == torch.uint8 else 1)
    if scales.dim() not in (1, 2) or scales.shape[0] != m:
        raise ModelLoadError(f"{name}.scales is {_describe(scales)}: expected [{m}] or [{m}, groups]")
    n_groups = scales.shape[1] if scales.dim() == 2 else 0
    group = k // n_groups if n_groups and k % n_groups == 0 else 0
    if q.dtype == torch.int8:
        if scales.dtype != torch.float16 or (scales.dim() == 2 and not group):
            raise ModelLoadError(f"{name}.scales is {_describe(scales)}, expected float16 [{m}]")
        return Int8Weight(q, scales, group or None)
    if scales.dtype != torch.float16 or group not in INT4_GROUP_SIZES:
        raise ModelLoadError(
            f"{name}.scales is {_describe(scales)}, expected float16 [{m}, {k} / G] with G in {INT4_GROUP_SIZES}"
        )
    zeros = parts["zeros"]
    packed = [m, (n_groups + 1) // 2]
    if list(zeros.shape) != {torch.uint8: packed, torch.float16: [m, n_groups]}.get(zeros.dtype):
        raise ModelLoadError(
            f"{name}.zeros is {_describe(zeros)}, expected uint8 {packed} (int4 zero points, two per byte)"
            f" or float16 [{m}, {n_groups}] (minima)"
        )
    return Int4Weight(q, scales, zeros, group)


def _require(qc: dict[str, Any], key: str, allowed: tuple, hint: str = "") -> Any:
    value = qc.get(key)
    if value not in allowed:
        raise ModelLoadError(
            f"quantization_config.{key} is {value!r}; perfxllm supports {', '.join(map(repr, allowed))}{hint}"
        )
    return value


class QuantizedFolder:
    """An HFFolder whose iter_tensors() yields the packed projections as one Int4Weight / Int8Weight each
    (under `<module>.weight`), and every other tensor as it is."""

    def __init__(self, folder: HFFolder) -> None:
        self.folder, self.path = folder, folder.folder
        self.config, self.tokenizer, self.tokenizer_config = (
            folder.config,
            folder.tokenizer,
            folder.tokenizer_config,
        )
        qc = folder.config["quantization_config"]
        if not isinstance(qc, dict):
            raise ModelLoadError("config.json: quantization_config is not an object")
        method = _require(qc, "quant_method", ("perfxllm", "awq"))
        self.modules: dict[str, str] = {}
        self.fields: tuple[str, ...]
        self.build: Callable[[str, dict[str, torch.Tensor]], Weight]
        if method == "perfxllm":
            hint = ": the packed layout changed, re-run `perfxllm quantize` on the original model"
            _require(qc, "format_version", (FORMAT_VERSION,), hint)
            _require(qc, "bits", (4, 8))
            self.modules = qc.get("modules")
            if not isinstance(self.modules, dict) or not self.modules:
                raise ModelLoadError(
                    "quantization_config.modules must map the packed modules to their format"
                )
            self.fields, self.build = PACKED_FIELDS, self._checked
        else:  # AutoAWQ; older configs say w_bit / q_group_size
            if str(qc.get("version", "gemm")).lower() != "gemm":
                raise ModelLoadError(
                    f"AutoAWQ version {qc.get('version')!r} is not supported (only GEMM checkpoints)"
                )
            qc = {
                "bits": qc.get("bits", qc.get("w_bit")),
                "group_size": qc.get("group_size", qc.get("q_group_size")),
                **qc,
            }
            _require(qc, "bits", (4,))
            _require(qc, "zero_point", (True, None))
            group = _require(qc, "group_size", INT4_GROUP_SIZES)
            self.fields = AWQ_FIELDS
            self.build = lambda name, parts: from_autoawq(name, parts, group)

    def _checked(self, name: str, parts: dict[str, torch.Tensor]) -> Weight:
        weight = _from_perfxllm(name, parts)
        listed = self.modules.get(module_key(name))
        if weight.format_name != listed:
            raise ModelLoadError(
                f"{name} is stored as {weight.format_name} but quantization_config.modules says {listed}"
            )
        return weight

    def _complete(self, parts: dict[str, torch.Tensor]) -> bool:
        if self.fields == PACKED_FIELDS and "qweight" in parts and parts["qweight"].dtype == torch.int8:
            return "scales" in parts
        return all(f in parts for f in self.fields)

    def iter_tensors(self) -> Iterator[tuple[str, Weight]]:
        pending: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.folder.iter_tensors():
            prefix, _, field = name.rpartition(".")
            if field not in self.fields:
                if field == "weight" and module_key(prefix) in self.modules:
                    raise ModelLoadError(
                        f"{name} is dense but quantization_config.modules lists it as {self.modules[module_key(prefix)]}"
                    )
                yield name, tensor
                continue
            parts = pending.setdefault(prefix, {})
            parts[field] = tensor
            if self._complete(parts):
                yield f"{prefix}.weight", self.build(prefix, pending.pop(prefix))
        for prefix, parts in pending.items():
            missing = next(f for f in self.fields if f not in parts)
            raise ModelLoadError(f"{self.path} lacks the tensor {prefix}.{missing}")
