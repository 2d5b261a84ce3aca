"""A/B of the CPU's C decode ops on this machine, one process: this tree's library against one built from another
commit's perfxllm/kernels/csrc (same compiler and flags), alternating. Decode attention and SiLU-and-multiply
alone, then the default model's decode with the step's C loop taken from each library in turn (one Engine,
the same prompts; their greedy tokens compared).

    PYTHONPATH=. python scripts/ab_cpu_decode_ops.py BASE_REV OUT.json
"""

from __future__ import annotations

import ctypes
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from perfxllm.bench import current_commit
from perfxllm.bench.kernels import _paged_setup
from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine
from perfxllm.kernels import cpu_lib
from perfxllm.model.loader import default_model_path
from perfxllm.sampling_params import SamplingParams

ATTENTION_CASES = [  # (query heads, kv heads, head dim, context, batch)
    (9, 3, 64, 144, 1),  # SmolLM2-135M
    (9, 3, 64, 1000, 1),
    (9, 3, 64, 4000, 1),
    (9, 3, 64, 144, 8),
    (32, 8, 128, 1000, 1),  # Llama-3-8B
    (32, 32, 128, 1000, 1),  # Llama-2-7B
]


def build_base(rev: str, out_dir: Path) -> ctypes.CDLL:
    src = out_dir / "csrc"
    src.mkdir()
    listed = subprocess.run(
        ["git", "ls-tree", "--name-only", rev, "perfxllm/kernels/csrc/"], capture_output=True, text=True
    )
    names = listed.stdout.split()
    if listed.returncode or not names:
        raise SystemExit(f"{rev!r} is not a commit of this repository with perfxllm/kernels/csrc")
    for name in names:
        text = subprocess.run(
            ["git", "show", f"{rev}:{name}"], capture_output=True, text=True, check=True
        ).stdout
        (src / Path(name).name).write_text(text)
    lib = out_dir / "base.so"
    cc = ["cc", *cpu_lib.FLAGS, *map(str, sorted(src.glob("*.c"))), "-o", str(lib), "-lm"]
    subprocess.run(cc, check=True)
    return cpu_lib._declare(ctypes.CDLL(str(lib)))


def median_us(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e6, 2)


def kernels(libs: dict[str, ctypes.CDLL]) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for hq, hkv, d, ctx, batch in ATTENTION_CASES:
        kc, vc, tables = _paged_setup([ctx] * batch, hkv, d, 16, device="cpu", dtype=torch.float32)
        q, lens = torch.randn(batch, hq, d), torch.full((batch,), ctx, dtype=torch.int32)
        out = torch.empty_like(q)
        args = (q.data_ptr(), q.stride(0), kc.data_ptr(), vc.data_ptr(), tables.data_ptr(), tables.shape[1])
        rest = (lens.data_ptr(), batch, hq, hkv, d, 16, d**-0.5, out.data_ptr())
        times = {name: [] for name in libs}
        for _ in range(3):
            for name, lib in libs.items():
                times[name].append(median_us(lambda lib=lib, a=args + rest: lib.decode_attention_f32(*a), 50))
        rows.append(dict(op="decode_attention_f32", hq=hq, hkv=hkv, d=d, context=ctx, batch=batch, us=times))
        print(rows[-1], flush=True)
    gate_up, out = torch.randn(1, 2 * 1536), torch.empty(1, 1536)
    times = {name: [] for name in libs}
    for _ in range(3):
        for name, lib in libs.items():
            call = lambda lib=lib: lib.silu_mul_f32(gate_up.data_ptr(), 1, 1536, out.data_ptr())  # noqa: E731
            times[name].append(median_us(call, 2000))
    rows.append(dict(op="silu_mul_f32", inter=1536, rows=1, us=times))
    print(rows[-1], flush=True)
    return rows


def decode(libs: dict[str, ctypes.CDLL], rounds: int = 5) -> list[dict]:
    engine = Engine(EngineConfig(model=default_model_path(), device="cpu", max_model_len=2048))
    graphs = engine.runner.graphs

    def generate(prompt_len: int, lib: ctypes.CDLL) -> tuple[float, list[int]]:
        graphs._decode = lib.llama_decode
        gen = torch.Generator().manual_seed(prompt_len)
        ids = torch.randint(100, 20000, (prompt_len,), generator=gen).tolist()
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))
        tokens, t_first = [], None
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.token_ids
            if t_first is None:
                t_first = time.perf_counter()
        return 127 / (time.perf_counter() - t_first), tokens

    rows = []
    for prompt_len in (64, 1000):
        tok_s, tokens = {name: [] for name in libs}, {}
        for _ in range(rounds):
            for name, lib in libs.items():
                rate, tokens[name] = generate(prompt_len, lib)
                tok_s[name].append(round(rate, 1))
        same = all(t == tokens["base"] for t in tokens.values())
        rows.append(dict(prompt_len=prompt_len, gen_len=128, decode_tok_s=tok_s, same_greedy_tokens=same))
        print(rows[-1], flush=True)
    return rows


def cpu_name() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next(
        (line.split(":")[1].strip() for line in text.splitlines() if "model name" in line), platform.machine()
    )


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    base, out = sys.argv[1], Path(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": build_base(base, Path(tmp)), "this": cpu_lib.load()}
        record = dict(
            device=f"{cpu_name()}, {torch.get_num_threads()} threads",
            commit=current_commit(),
            base=subprocess.run(["git", "rev-parse", base], capture_output=True, text=True).stdout.strip(),
            torch=torch.__version__,
            python=platform.python_version(),
            command="python " + shlex.join(sys.argv),
            note="us: the median of each call's repeats, three rounds alternating; decode token/s from the first "
            "token to the 128th, five rounds alternating; model SmolLM2-135M-Instruct Q4_1",
            kernels=kernels(libs),
            decode=decode(libs),
        )
    out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
