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

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))
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
    sources = [p.read_bytes() for p in sorted(CSRC.glob("*.[ch]"))]
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


_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# name: (argument types, return type), as declared in csrc/cpu_kernels.h
SIGNATURES = {
    "int4_matmul": ([_p, _i64, _i64, _p, _p, _p, _i32, _i64, _i64, _p, _p], None),
    "int8_matmul": ([_p, _i64, _i64, _p, _p, _i64, _i64, _i64, _p, _p], None),
    "int4_dequantize": ([_p, _p, _p, _i32, _i64, _i64, _i64, _p], None),
    "int8_dequantize": ([_p, _p, _i64, _i64, _i64, _p], None),
    "add_rmsnorm_f32": ([_p, _p, _p, _i64, _i64, _f32, _p, _p], None),
    "silu_mul_f32": ([_p, _i64, _i64, _p], None),
    "rope_cache_write_f32": ([_p, _i64, _i64, _i64, _i64, _p, _p, _p, _p, _p], None),
    "decode_attention_f32": ([_p, _i64, _p, _p, _p, _i64, _p, _i64, _i64, _i64, _i64, _i64, _f32, _p], None),
    "llama_decode_work_size": ([_p, _i64], _i64),
    "llama_decode": ([_p, _i64, _p, _p, _p, _p, _i64, _p, _p, _p, _p], None),
}


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, (argtypes, restype) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib
