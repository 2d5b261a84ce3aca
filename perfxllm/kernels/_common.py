"""Helpers shared by the kernel launchers: argument checks with clear errors, and a small on-disk tuner.

Imports no triton (the torch-only ops use the checks on the CPU path too); tuning imports it when it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import statistics
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
log = logging.getLogger(__name__)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_tensor(
    name: str,
    t: object,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> None:
    """Raise ValueError naming the argument when t is not a tensor of the wanted kind.

    shape entries of None match any size."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        want = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype {want}, got {str(t.dtype).removeprefix('torch.')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and (
        t.dim() != len(shape) or any(w is not None and w != s for w, s in zip(shape, t.shape))
    ):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (strides {t.stride()} for shape {list(t.shape)})")


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")


def to_device(
    values: list | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """values (a list as dtype, or a CPU tensor) on device, copied without waiting (see copy_to): building a
    tensor on the GPU from a list (or indexing a GPU tensor with a list) copies with a wait for the device,
    which under async scheduling is the step in flight."""
    return _host(values, dtype, device.type == "cuda").to(device, non_blocking=True)


def copy_to(dest: torch.Tensor, values: list | torch.Tensor) -> None:
    """Copy values (a list, or a tensor on the CPU) into dest without waiting for the device. From pageable
    memory the driver stages a copy through a pinned buffer and, past some 64 KB, waits for the stream to
    reach it (a decode step's block tables at 1024 sequences, a long prefill's slots): so the values go
    through page-locked memory, which PyTorch's host allocator keeps until the copy is done."""
    dest.copy_(_host(values, dest.dtype, dest.is_cuda), non_blocking=True)


def _host(values: list | torch.Tensor, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return host.pin_memory() if pinned else host


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


class DiskTuner:
    """Picks the fastest of several configs for a key on first use, timing each on the GPU, and remembers
    the choice in memory and in a JSON file (~/.cache/perfxllm/<name>-<hash>.json or $PERFXLLM_CACHE_DIR).
    The hash is of kernel_file, the module whose kernels are tuned: picks made for another version of them
    (or by another way of timing them) are not reused.

    Each config is timed inside a CUDA graph, as the decode step runs it: timed from Python, a kernel of a
    few microseconds measures the launch overhead instead, and the pick is noise.

    Under the Triton interpreter nothing is timed: the first config is used."""

    def __init__(self, name: str, kernel_file: str) -> None:
        root = Path(os.environ.get("PERFXLLM_CACHE_DIR", Path.home() / ".cache" / "perfxllm"))
        digest = hashlib.sha256(Path(kernel_file).read_bytes()).hexdigest()[:12]
        self.path = root / f"{name}-{digest}.json"
        self.best: dict[str, dict] | None = None
        self.picked: dict[str, dict] = {}  # this process's choices: a repeat call builds no candidate list

    def _load(self) -> dict[str, dict]:
        if self.best is None:
            try:
                self.best = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self.best = {}
        return self.best

    def pick(
        self,
        key: str,
        candidates: Callable[[], list[dict]],
        run: Callable[[dict], object],
        build: Callable[[dict], Hashable | None] = repr,
    ) -> dict:
        """The config for key; candidates() is called only the first time this process sees the key.

        run(config) is called from several threads at once: before timing, each candidate is run once on a
        pool of threads so that the compiles overlap (see _compile_all). build(config) says which configs
        compile to one kernel (equal values; None: nothing to compile ahead), so each is built once."""
        if key not in self.picked:
            configs = candidates()
            if interpreting() or len(configs) == 1:
                self.picked[key] = configs[0]
            else:
                self.picked[key] = self._tuned(key, configs, run, build)
        return self.picked[key]

    def _tuned(
        self,
        key: str,
        configs: list[dict],
        run: Callable[[dict], object],
        build: Callable[[dict], Hashable | None],
    ) -> dict:
        from triton.runtime.errors import OutOfResources

        best = self._load()
        if key in best and best[key] in configs:
            return best[key]
        # time_in_graph runs on a stream of its own that does not wait for this one: without the wait, a
        # config under test could share a workspace or scratch buffer with kernels still queued here.
        torch.cuda.synchronize()
        _compile_all(configs, run, build)
        times = []
        for cfg in configs:
            try:
                times.append(time_in_graph(lambda cfg=cfg: run(cfg)))
            except OutOfResources:
                times.append(float("inf"))
            except Exception as e:  # a config this GPU or compiler cannot build is not a candidate
                log.warning("tuning %s: skipping %s: %s: %s", key, cfg, type(e).__name__, str(e)[:200])
                times.append(float("inf"))
        best[key] = configs[min(range(len(configs)), key=times.__getitem__)]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(best, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError:
            pass  # an unwritable cache only costs re-tuning next time
        return best[key]


def _compile_all(
    configs: list[dict], run: Callable[[dict], object], build: Callable[[dict], Hashable | None]
) -> None:
    """Run one config of each build once, the first here and the others on a pool of threads: Triton's
    compiler and ptxas let go of the GIL, so the compiles overlap (one after another they took most of a
    7B model's start-up). A config that fails here fails again when it is timed, which skips it."""
    builds = {}
    for cfg in configs:
        b = build(cfg)
        if b is not None:
            builds.setdefault(b, cfg)
    if len(builds) < 2:
        return
    first, *rest = builds.values()
    device = torch.cuda.current_device()

    def run_once(cfg: dict) -> None:
        torch.cuda.set_device(device)  # a new thread starts on device 0, and on its default stream
        with contextlib.suppress(Exception):
            run(cfg)

    run_once(first)  # lazy state (Triton's per-device caches, workspaces) is made by one thread
    with ThreadPoolExecutor(min(len(rest), os.cpu_count() or 1)) as pool:
        list(pool.map(run_once, rest))
    torch.cuda.synchronize()


_timing_streams: dict[int, torch.cuda.Stream] = {}


def time_in_graph(fn: Callable[[], object], rep_ms: float = 5.0) -> float:
    """Median milliseconds of one fn() replayed from a CUDA graph of about rep_ms of calls, as
    triton.testing.do_bench_cudagraph times it, but always on the same side stream: PyTorch keeps a cuBLAS
    workspace for every stream cuBLAS has run on, and do_bench_cudagraph takes another stream per call (a
    process that had tuned a 7B int4 model held about 0.4 GB more than one that found the choices cached)."""
    device = torch.cuda.current_device()
    if device not in _timing_streams:
        _timing_streams[device] = torch.cuda.Stream()
    stream = _timing_streams[device]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        fn()  # compiles
        start.record()
        for _ in range(5):
            fn()
        end.record()
        end.synchronize()
        repeats = max(1, min(1000, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(repeats):
                fn()
        times = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / repeats)
    return statistics.median(times)
