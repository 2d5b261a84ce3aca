"""The kernels' shared helpers (the tuner's per-process memory of its choices), and what every kernel
declares."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from perfxllm.kernels._common import DiskTuner, copy_to, time_in_graph, to_device

# Run where TRITON_INTERPRET is unset: only there does @triton.jit keep its do_not_specialize list.
UNSPECIALIZED_CHECK = """
import importlib, pkgutil, triton, perfxllm.kernels as k
found = 0
for m in pkgutil.iter_modules(k.__path__):
    for obj in vars(importlib.import_module(f"perfxllm.kernels.{m.name}")).values():
        if isinstance(obj, triton.runtime.jit.JITFunction) and obj.do_not_specialize:
            unknown = set(obj.do_not_specialize) - set(obj.arg_names)
            assert not unknown, f"{obj.fn.__name__}: do_not_specialize names no parameter {unknown}"
            found += 1
print(found)
"""


@pytest.fixture
def no_cuda_calls(monkeypatch):
    """The tuner's device calls made harmless, for timing that a test stands in for."""
    from perfxllm.kernels import _common

    monkeypatch.setattr(_common.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(_common.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_common.torch.cuda, "set_device", lambda device: None)


def test_tuner_builds_the_candidates_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("PERFXLLM_CACHE_DIR", str(tmp_path))
    tuner = DiskTuner("test", __file__)
    built = []

    def candidates(tag: str) -> list[dict]:
        built.append(tag)
        return [{"BLOCK": 16, "tag": tag}]  # one choice: nothing is timed, on any machine

    def run(cfg: dict) -> None:
        raise AssertionError("a one-choice pick times nothing")

    first = tuner.pick("a", lambda: candidates("a"), run)
    assert tuner.pick("a", lambda: candidates("a"), run) == first
    assert tuner.pick("b", lambda: candidates("b"), run) == {"BLOCK": 16, "tag": "b"}
    assert built == ["a", "b"]


def test_tuner_keeps_picks_per_version_of_the_kernels(tmp_path, monkeypatch, no_cuda_calls):
    """A pick made for one version of a kernel module is reused by that version alone: an upgrade that
    changes the kernels (or how they are timed) tunes them again."""
    monkeypatch.setenv("PERFXLLM_CACHE_DIR", str(tmp_path / "cache"))
    module = tmp_path / "kernels.py"
    module.write_text("# version 1\n")
    monkeypatch.setattr("perfxllm.kernels._common._compile_all", lambda *args: None)
    monkeypatch.setattr("perfxllm.kernels._common.time_in_graph", lambda fn: fn())
    configs = [{"BLOCK": 16}, {"BLOCK": 32}]
    v1 = DiskTuner("op", str(module))
    assert v1._tuned("k", configs, lambda cfg: 1.0 / cfg["BLOCK"], repr) == {"BLOCK": 32}
    assert DiskTuner("op", str(module))._tuned("k", configs, lambda cfg: 1 / 0, repr) == {"BLOCK": 32}
    module.write_text("# version 2\n")
    v2 = DiskTuner("op", str(module))
    assert v2.path != v1.path
    assert v2._tuned("k", configs, lambda cfg: float(cfg["BLOCK"]), repr) == {"BLOCK": 16}


def test_unspecialized_arguments_are_parameters():
    """Triton ignores a do_not_specialize name that is not a parameter of the kernel: a typo there would
    silently bring back the recompiles it is meant to prevent."""
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", UNSPECIALIZED_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) >= 5  # the kernels that take a token count, a table width or a partition count


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_timing_in_graphs_leaves_no_memory_behind():
    """cuBLAS keeps a workspace per stream: timing on a new stream each time (as do_bench_cudagraph does)
    kept tens of MB per timed config."""
    a = torch.randn(512, 512, device="cuda", dtype=torch.float16)
    assert time_in_graph(lambda: a @ a) > 0  # the first call may allocate the stream's workspace
    before = torch.cuda.memory_allocated()
    for _ in range(5):
        time_in_graph(lambda: a @ a)
    assert torch.cuda.memory_allocated() - before < 2**20


def test_tuner_skips_a_config_that_fails_to_build(tmp_path, monkeypatch, no_cuda_calls):
    """A candidate whose compile or launch raises is not picked, and the others are still timed."""
    from perfxllm.kernels import _common

    monkeypatch.setenv("PERFXLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_common, "time_in_graph", lambda fn: fn())  # "time": what run() returns

    def run(cfg: dict) -> float:
        if cfg["BLOCK"] == 16:
            raise RuntimeError("PassManager::run failed")
        return cfg["BLOCK"]

    configs = [{"BLOCK": 16}, {"BLOCK": 64}, {"BLOCK": 32}]
    assert DiskTuner("test", __file__)._tuned("k", configs, run, repr) == {"BLOCK": 32}


def test_the_cpu_path_imports_without_triton():
    """kernels/__init__ promises it: the engine, the server and the CLI import on a machine without triton (the
    torch-only ops, such as sampling, share _common's checks)."""
    blocker = (
        "import sys\n"
        "class NoTriton:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'triton':\n"
        "            raise ImportError('triton is blocked')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "import perfxllm.engine.engine, perfxllm.kernels.sampling, perfxllm.cli\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_host_values_arrive_whole(device):
    """to_device and copy_to, past the size where a copy from pageable memory would wait for the stream
    (they go through pinned memory), behind work still running on the GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    values = list(range(-5, 300_000))
    if device == "cuda":
        torch.cuda._sleep(10**7)  # the stream is busy while the copies are queued
    moved = to_device(values, torch.device(device), torch.int32)
    dest = torch.zeros(len(values) + 3, dtype=torch.int64, device=device)
    copy_to(dest[:-3], values)
    assert moved.dtype == torch.int32 and moved.tolist() == values
    assert dest.tolist() == [*values, 0, 0, 0]


def test_tuner_compiles_one_config_per_build_on_threads(no_cuda_calls):
    """Before timing, the tuner runs one config of each build: the first on the calling thread (it makes
    the lazy state), the others on a pool; a config that fails there is left for the timing to skip."""
    import threading

    from perfxllm.kernels import _common

    ran, lock = [], threading.Lock()

    def run(cfg: dict) -> None:
        with lock:
            ran.append((cfg["BLOCK"], threading.get_ident()))
        if cfg["BLOCK"] == 64:
            raise RuntimeError("out of shared memory")

    configs = [{"BLOCK": b, "SPLIT": s} for b in (16, 32, 64, 128) for s in (1, 2)] + [{"BLOCK": 0}]
    _common._compile_all(configs, run, lambda c: c["BLOCK"] or None)
    assert sorted(b for b, _ in ran) == [16, 32, 64, 128]
    assert ran[0] == (16, threading.get_ident())
