"""`perfxllm quantize`, `perfxllm eval ppl` and `perfxllm info --estimate` as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

from perfxllm.info import estimate_weight_bytes
from perfxllm.model.config import ModelConfig
from perfxllm.model.random_weights import PRESETS


def perfxllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "perfxllm", *args], capture_output=True, text=True, timeout=300
    )


def test_llama2_7b_int4_g128_fits_in_3_9_gb():
    est = {
        k: sum(v.values())
        for k, v in estimate_weight_bytes(ModelConfig.from_hf(PRESETS["llama2-7b"])).items()
    }
    assert est["fp16"] == 6_738_415_616 * 2  # Llama-2-7B's parameter count, in fp16
    assert est["int4 g128"] <= 3.9 * 2**30  # embeddings and lm_head fp16: 3.65 GiB = 3.91 GB
    assert est["int4 g128, lm_head int4"] <= 3.9e9  # 3.72 GB


def test_estimate_cli():
    r = perfxllm("info", "--estimate", "llama2-7b")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("int4 g128 "))
    assert float(line.split()[2]) <= 3.9  # GiB


def test_quantize_then_generate_and_eval(tiny_llama, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "q"
    r = perfxllm(
        "quantize", str(tiny_llama), "-o", str(out), "--method", "awq", "--group-size", "64",
        "--calib", str(calib), "--n-samples", "4", "--seq-len", "64",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "embeddings dense, lm_head dense" in r.stderr
    record = tmp_path / "ppl.json"
    r = perfxllm(
        "eval", "ppl", str(out), "--text", str(calib), "--ctx", "64", "--max-windows", "3",
        "--record", str(record), "--name", "awq",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    entry = json.loads(record.read_text())["results"]["awq"]
    assert entry["windows"] == 3 and entry["ppl"] > 1 and entry["command"].startswith("perfxllm eval ppl")
    r = perfxllm("info", str(out))
    assert r.returncode == 0 and "int4 g64" in r.stdout, r.stderr
    r = perfxllm("quantize", str(out), "-o", str(tmp_path / "again"))
    assert r.returncode == 2 and "already quantized" in r.stderr
