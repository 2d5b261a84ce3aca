"""The C kernels of the CPU path (perfxllm/kernels/csrc/*.c, one library), compiled on first use with the machine's C compiler
for its own CPU (-march=native) and cached by a hash of source, compiler and CPU; loaded with ctypes.

They use OpenMP through libgomp.so.1, the library torch's own CPU wheels load, so the process keeps one
thread pool and torch.set_num_threads governs both. No compiler: `load` warns once and returns None, and
the CPU keeps the dense weights (see perfxllm.layers.linear.for_device).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
# -ffp-contract=off: no fused multiply-adds but the ones written out, so that dequantizing rounds exactly as
# the torch reference does (the kernels' own FMAs are intrinsics).
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")


def cache_dir() -> Path:
    root = os.environ.get("PERFXLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "perfxllm"
    )
    return Path(root) / "kernels"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith(("model name", "flags"))), "")


@functools.cache
def load() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        warnings.warn("no C compiler (cc): the CPU runs quantized models dequantized, slower", stacklevel=2)
        return None
    sources = [p.read_bytes() for p in SOURCES]
    key = hashlib.sha256(b"\0".join([*sources, cc.encode(), " ".join(FLAGS).encode(), _cpu_model().encode()]))
    lib = cache_dir() / f"perfxllm-cpu-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            r = subprocess.run(
                [cc, *FLAGS, *map(str, SOURCES), "-o", str(out), "-lm"], capture_output=True, text=True
            )
            if r.returncode != 0:
                warnings.warn(
                    f"compiling the CPU kernels failed ({cc}): the CPU runs quantized models dequantized, "
                    f"slower\n{r.stderr[-2000:]}",
                    stacklevel=2,
                )
                return None
            os.replace(out, lib)  # atomic: concurrent processes each build and one wins
    return _declare(ctypes.CDLL(str(lib)))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.int4_matmul.argtypes = [p, i64, i64, p, p, p, i32, i64, i64, p, p]
    lib.int4_matmul.restype = None
    lib.int8_matmul.argtypes = [p, i64, i64, p, p, i64, i64, i64, p, p]
    lib.int8_matmul.restype = None
    lib.int4_dequantize.argtypes = [p, p, p, i32, i64, i64, i64, p]
    lib.int4_dequantize.restype = None
    lib.int8_dequantize.argtypes = [p, p, i64, i64, i64, p]
    lib.int8_dequantize.restype = None
    lib.add_rmsnorm_f32.argtypes = [p, p, p, i64, i64, f32, p, p]
    lib.silu_mul_f32.argtypes = [p, i64, i64, p]
    lib.rope_cache_write_f32.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p]
    lib.decode_attention_f32.argtypes = [p, i64, p, p, p, i64, p, i64, i64, i64, i64, i64, f32, p]
    lib.llama_decode_work_size.argtypes = [p, i64]
    lib.llama_decode_work_size.restype = i64
    lib.llama_decode.argtypes = [p, i64, p, p, p, p, i64, p, p, p, p]
    for fn in (
        lib.llama_decode,
        lib.add_rmsnorm_f32,
        lib.silu_mul_f32,
        lib.rope_cache_write_f32,
        lib.decode_attention_f32,
    ):
        fn.restype = None
    return lib
