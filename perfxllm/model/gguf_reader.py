"""A GGUF file's metadata and tensor directory, parsed with struct; the tensor data stays in a read-only
memory map. The gguf package's own reader walks every metadata value through numpy views and spends about
7 s on the default model's 49,152-token vocabulary; this takes a fraction of a second.

Layout (little-endian, version 2 and 3): b"GGUF", uint32 version, uint64 tensor count, uint64 metadata count;
the metadata (string key, uint32 value type, value); the tensor infos (string name, uint32 dims, uint64 per
dim with the row length first, uint32 type, uint64 offset); then, aligned to general.alignment (default 32),
the tensor data, each at its offset from there. A string is a uint64 length and its bytes; an array a uint32
element type, a uint64 count and the elements.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from perfxllm.errors import ModelLoadError, shown

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
# A metadata value's expected Python type: its name in errors, singular and plural.
_KINDS = {
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
    bool: ("a boolean", "booleans"),
}


def _is(value: Any, kind: type) -> bool:
    """GGUF's integer types read as int, float32 / float64 as float and bool as bool; a number may be
    stored as any of the integer and float types."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def meta_value(meta: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """meta[key] (default if it is absent), which must be a `kind` (int, float, str or bool)."""
    value = meta.get(key, default)
    if value is not None and not _is(value, kind):
        raise ModelLoadError(f"GGUF metadata {key} is {shown(value)}, not {_KINDS[kind][0]}")
    return value


def meta_array(meta: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    """meta[key] ([] if it is absent), which must be an array of `kind`s."""
    values = meta.get(key)
    if values is None:
        return []
    if not isinstance(values, list) or not all(_is(v, kind) for v in values):
        raise ModelLoadError(f"GGUF metadata {key} is {shown(values)}, not an array of {_KINDS[kind][1]}")
    return values


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: the row length first
    data_offset: int
    n_bytes: int
    data: np.ndarray  # uint8 [rows, bytes per row], a view of the file (shorter than n_bytes if truncated)


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.pos = 0
        magic, version, n_tensors, n_kv = self._unpack("<4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.fields[key] = self._value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {_MAX_DIMS})")
            shape = self._unpack(f"<{n_dims}Q")
            if min(shape) < 1:
                raise ValueError(f"tensor {name!r} has an empty dimension: {list(shape)}")
            qtype, offset = self._unpack("<IQ")
            infos.append((name, GGMLQuantizationType(qtype), shape, offset))
        alignment = self.fields.get("general.alignment", 32)
        if not _is(alignment, int) or alignment < 1:
            raise ValueError(f"general.alignment is {shown(alignment)}, not a positive integer")
        data_start = -(-self.pos // alignment) * alignment
        self.tensors = [
            self._tensor(name, qtype, shape, data_start + off) for name, qtype, shape, off in infos
        ]

    def _tensor(
        self, name: str, qtype: GGMLQuantizationType, shape: tuple[int, ...], start: int
    ) -> GGUFTensor:
        block, size = GGML_QUANT_SIZES[qtype]
        if shape[0] % block:
            raise ValueError(
                f"tensor {name!r} has rows of {shape[0]} values, not whole {qtype.name} blocks of {block}"
            )
        row_bytes = shape[0] // block * size
        rows = math.prod(shape[1:])  # Python ints: a corrupt shape must not wrap around
        n_bytes = rows * row_bytes
        data = self.buf[start : start + n_bytes]
        if data.nbytes == n_bytes:
            data = data.reshape(rows, row_bytes)
        return GGUFTensor(name, qtype, tuple(int(n) for n in shape), start, n_bytes, data)

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode(
            "utf-8", "replace"
        )  # token texts can be any bytes
        self.pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])[0]
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = self._unpack("<IQ")
        if count > len(self.buf) - self.pos:
            raise ValueError(f"an array of {count} values runs past the end of the file")
        if etype in _SCALARS and etype != 7:
            dtype = np.dtype(_SCALARS[etype])
            values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
            self.pos += count * dtype.itemsize
            return values
        return [self._value(etype) for _ in range(count)]
