"""Kernel tests run on the GPU when there is one, else under the Triton interpreter on the CPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before the
test modules import the kernels. Without triton every test module here is replaced by one skipped test."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

NO_TRITON = "triton is not installed: the Triton kernel tests need it (pip install triton)"

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

if importlib.util.find_spec("triton") is None:

    class _Skipped(pytest.Item):
        def runtest(self) -> None:
            pytest.skip(NO_TRITON)

    class _NoTriton(pytest.File):
        def collect(self):
            yield _Skipped.from_parent(self, name="needs_triton")

    def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.File:
        return _NoTriton.from_parent(parent, path=module_path)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {list(out64.shape)} != reference shape {list(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


@pytest.fixture
def rel_err():
    """rel_err(out, ref): ‖out − ref‖ / ‖ref‖ in float64; NaN or inf anywhere in out gives inf, so
    NaN (an unwritten poisoned element) never passes."""
    return _rel_err
