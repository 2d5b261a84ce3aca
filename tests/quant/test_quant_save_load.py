"""Quantized folders: save and load round trips, and clear errors for corrupt or mismatched ones."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from perfxllm.engine.model_runner import prompt_logits
from perfxllm.errors import ModelLoadError
from perfxllm.kernels.quant_matmul_cpu import GEMM_MIN_TOKENS, CPUInt4Weight, CPUInt8Weight
from perfxllm.model.loader import build_model, open_checkpoint
from perfxllm.quant.pipeline import quantize_model
from perfxllm.quant.rtn import QuantSpec
from perfxllm.quant.save import save_quantized

CPU = torch.device("cpu")


def quantized_folder(src: Path, out: Path, method: str, bits: int) -> torch.nn.Module:
    ckpt = open_checkpoint(str(src))
    model = build_model(ckpt, CPU, torch.float32)
    samples = torch.randint(0, ckpt.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, QuantSpec(bits, 32), method, samples.tolist(), progress=False)
    save_quantized(model, ckpt, out, {"method": method, "bits": bits, "group_size": 32})
    return model


@pytest.mark.parametrize(("method", "bits"), [("awq", 4), ("rtn", 8)])
def test_round_trip_gives_identical_logits(tiny_llama, tmp_path, method, bits):
    model = quantized_folder(tiny_llama, tmp_path / "q", method, bits)
    loaded = build_model(open_checkpoint(str(tmp_path / "q")), CPU, torch.float32)
    packed = CPUInt4Weight if bits == 4 else CPUInt8Weight  # the CPU kernels' layouts of the saved formats
    assert isinstance(loaded.layers[0].self_attn.qkv_proj.weight, packed)
    assert isinstance(loaded.lm_head.weight, torch.Tensor)  # lm_head stays dense by default
    ids = list(range(3, 11 + GEMM_MIN_TOKENS))  # long enough for the exact path: dequantize, then a GEMM
    assert torch.equal(prompt_logits(model, ids), prompt_logits(loaded, ids))
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == method and qc["bits"] == bits and qc["format_version"] == 2
    assert set(qc["modules"]) == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "q" / name).exists()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("saved")
    quantized_folder(save_tiny_model(root / "src"), root / "q", "rtn", 4)
    return root / "q"


def broken_copy(saved: Path, tmp_path: Path, tensors=None, config=None) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in saved.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if tensors is not None:
        t = load_file(folder / "model.safetensors")
        tensors(t)
        save_file(t, folder / "model.safetensors")
    if config is not None:
        c = json.loads((folder / "config.json").read_text())
        config(c["quantization_config"])
        (folder / "config.json").write_text(json.dumps(c))
    return folder


Q = "model.layers.1.self_attn.q_proj"

BROKEN = {
    "missing scales": (lambda t: t.pop(f"{Q}.scales"), None, f"lacks the tensor {Q}.scales"),
    "missing module": (
        lambda t: [t.pop(f"{Q}.{f}") for f in ("qweight", "scales", "zeros")],
        None,
        f"lacks weights: {Q}.weight",
    ),
    "scales shape": (
        lambda t: t.update({f"{Q}.scales": torch.cat([t[f"{Q}.scales"], t[f"{Q}.scales"][:, :1]], 1)}),
        None,
        f"{Q}.scales is float16",
    ),
    "zeros dtype": (lambda t: t.update({f"{Q}.zeros": t[f"{Q}.zeros"].float()}), None, f"{Q}.zeros"),
    "zeros one per byte": (
        lambda t: t.update({f"{Q}.zeros": torch.full((64, 2), 8, dtype=torch.uint8)}),
        None,
        f"{Q}.zeros is uint8 [64, 2], expected uint8 [64, 1] (int4 zero points, two per byte)",
    ),
    "rows": (
        lambda t: [
            t.update({f"{Q}.{f}": t[f"{Q}.{f}"][:-1].contiguous()}) for f in ("qweight", "scales", "zeros")
        ],
        None,
        f"{Q}.weight has shape (63, 64), expected (64, 64)",
    ),
    "dense where packed": (
        lambda t: (
            [t.pop(f"{Q}.{f}") for f in ("qweight", "scales", "zeros")]
            + [t.update({f"{Q}.weight": torch.zeros(64, 64)})]
        ),
        None,
        "is dense but quantization_config.modules",
    ),
    "bits": (None, lambda qc: qc.update(bits=3), "quantization_config.bits is 3"),
    "method": (None, lambda qc: qc.update(quant_method="gptq"), "quantization_config.quant_method is 'gptq'"),
    "version": (
        None,
        lambda qc: qc.update(format_version=1),
        "format_version is 1; perfxllm supports 2: the packed layout changed, re-run `perfxllm quantize`",
    ),
    "modules": (None, lambda qc: qc["modules"].update({"self_attn.q_proj": "int8"}), "modules says int8"),
    "no modules": (None, lambda qc: qc.pop("modules"), "quantization_config.modules"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_corrupt_or_mismatched_folder(saved, tmp_path, case):
    tensors, config, message = BROKEN[case]
    folder = broken_copy(saved, tmp_path, tensors, config)
    with pytest.raises(ModelLoadError, match=re.escape(message)):
        build_model(open_checkpoint(str(folder)), CPU, torch.float32)


def test_not_an_object(saved, tmp_path):
    folder = broken_copy(saved, tmp_path)
    c = json.loads((folder / "config.json").read_text())
    c["quantization_config"] = "awq"
    (folder / "config.json").write_text(json.dumps(c))
    with pytest.raises(ModelLoadError, match="quantization_config is not an object"):
        open_checkpoint(str(folder))


@pytest.mark.parametrize("case", ["missing scales", "modules"])
def test_cli_reports_a_broken_folder_in_one_line(saved, tmp_path, case):
    tensors, config, message = BROKEN[case]
    folder = broken_copy(saved, tmp_path, tensors, config)
    r = subprocess.run(
        [sys.executable, "-m", "perfxllm", "eval", "ppl", str(folder), "--ctx", "16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = [line for line in r.stderr.splitlines() if line.startswith("perfxllm: error:")]
    assert message in line
