"""`perfxllm quantize`, `perfxllm eval ppl` and `perfxllm info --estimate` as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from perfxllm.info import estimate_weight_bytes, weight_bytes_by_format
from perfxllm.model.config import ModelConfig
from perfxllm.model.loader import build_model, open_checkpoint
from perfxllm.model.random_weights import PRESETS
from perfxllm.quant.pipeline import quantize_model
from perfxllm.quant.rtn import QuantSpec


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
    # Projections int4 g128: 0.5 byte a weight + a float16 scale and an int4 zero point (half a byte) per
    # 128 = 3.238 + 0.101 + 0.025 GB; embeddings and lm_head float16 = 0.524 GB; norms 0.5 MB: 3.89 GB
    # (10^9 bytes) = 3.62 GiB. Zero points one per byte would add 25 MB: 3.91 GB, over 3.9.
    assert est["int4 g128"] == 3_889_307_648
    assert est["int4 g128"] <= 3.9e9
    assert est["int4 g128, lm_head int4"] <= 3.9e9  # 3.70 GB: lm_head int4, embeddings float16


@pytest.mark.parametrize(
    ("label", "spec", "lm_head"),
    [
        ("fp16", None, False),
        ("int8", QuantSpec(8), False),
        ("int4 g128", QuantSpec(4, 128), False),
        ("int4 g128, lm_head int4", QuantSpec(4, 128), True),
    ],
)
def test_estimate_is_what_a_quantized_model_holds(tiny_llama, label, spec, lm_head):
    """The estimate builds the model on meta tensors; a real model quantized the same way holds exactly those
    bytes, so the 7B figure above is what a 7B model would hold, without 14 GB of RAM to show it."""
    ckpt = open_checkpoint(str(tiny_llama))
    model = build_model(ckpt, torch.device("cpu"), torch.float16)
    if spec is not None:
        quantize_model(model, spec, "rtn", quantize_lm_head=lm_head, progress=False)
    assert weight_bytes_by_format(model) == estimate_weight_bytes(ckpt.config)[label]


def test_estimate_cli():
    r = perfxllm("info", "--estimate", "llama2-7b")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if line.startswith("int4 g128 "))
    assert line.split()[2:6] == ["3.62", "GiB", "3.89", "GB"]


def test_quantize_then_generate_and_eval(tiny_llama, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "q"
    r = perfxllm(
        "quantize", str(tiny_llama), "-o", str(out), "--method", "awq", "--group-size", "64",
        "--calib", str(calib), "--n-samples", "4", "--seq-len", "64",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "(int4 g64: qkv, o, gate_up, down)" in r.stderr  # the group size used, per projection
    assert "embeddings dense, lm_head dense" in r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["awq"]["search_loss_vs_rtn"]) == {"qkv", "gate_up", "down"}  # o: the tiny model has GQA
    assert all(0 < v <= 1 for v in qc["awq"]["search_loss_vs_rtn"].values())
    record = tmp_path / "ppl.json"
    r = perfxllm(
        "eval", "ppl", str(out), "--text", str(calib), "--ctx", "64", "--max-windows", "3",
        "--record", str(record), "--name", "awq",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    entry = json.loads(record.read_text())["results"]["awq"]
    assert entry["windows"] == 3 and entry["ppl"] > 1 and entry["command"].startswith("perfxllm eval ppl")
    assert entry["device"] == "cpu" and entry["device_name"] and entry["activation_dtype"] == "float32"
    assert "int4 g64" in entry["weight_bytes"] and "perfxllm_commit" in entry
    r = perfxllm("info", str(out))
    assert r.returncode == 0 and "int4 g64" in r.stdout, r.stderr
    r = perfxllm("quantize", str(out), "-o", str(tmp_path / "again"))
    assert r.returncode == 2 and "already quantized" in r.stderr


def test_quantize_refuses_widths_no_group_divides(tmp_path):
    from tiny_models import save_tiny_model

    folder = save_tiny_model(tmp_path / "m", intermediate_size=80)  # down_proj: 80 = 2 * 32 + 16
    r = perfxllm("quantize", str(folder), "-o", str(tmp_path / "q"), "--method", "rtn")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "in_features 80 is not a multiple of 32" in r.stderr
    assert not (tmp_path / "q").exists()
