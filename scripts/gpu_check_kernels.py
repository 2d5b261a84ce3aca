"""Run `perfxllm bench kernels` on a GPU machine: checks every kernel at real sizes and times it.

    PYTHONPATH=. python scripts/gpu_check_kernels.py --out-dir $OUT

Works where `import perfxllm` itself cannot (a package the engine needs is missing on the GPU machine):
the kernels and the benchmark need only torch, triton and matplotlib.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import perfxllm  # noqa: F401
except ImportError as e:
    print(f"import perfxllm failed ({e}); loading its kernels without the engine", file=sys.stderr)
    pkg = types.ModuleType("perfxllm")
    pkg.__path__ = [str(ROOT / "perfxllm")]
    sys.modules["perfxllm"] = pkg

from perfxllm.bench.kernels import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
