"""AutoAWQ GEMM checkpoints, packed here from the format's description, load as perfxllm int4 weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from perfxllm.engine.model_runner import prompt_logits
from perfxllm.errors import ModelLoadError
from perfxllm.kernels.quant_matmul_cpu import GEMM_MIN_TOKENS, CPUInt4Weight
from perfxllm.model.loader import build_model, open_checkpoint

G = 32
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # int32 nibble i holds output channel 8c + ORDER[i]


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] of 0..15 -> int32 [R, C // 8], one int32 column at a time as AutoAWQ's packer does."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for col in range(packed.shape[1]):
        for i in range(8):
            packed[:, col] |= values[:, col * 8 + ORDER[i]].long() << (4 * i)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def make_awq_folder(src, dst, ref):
    """dst: an AutoAWQ GEMM copy of src with random int4 weights; ref: the same weights dense."""
    shutil.copytree(src, dst)
    shutil.copytree(src, ref)
    tensors = load_file(src / "model.safetensors")
    awq, dense = {}, {}
    g = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        if not name.endswith("_proj.weight"):
            awq[name] = dense[name] = t
            continue
        m, k = t.shape
        q = torch.randint(0, 16, (m, k), generator=g)
        z = torch.randint(0, 16, (m, k // G), generator=g)
        s = (torch.rand(m, k // G, generator=g) * 0.02 + 0.001).half()
        dense[name] = (q - z.repeat_interleave(G, 1)) * s.float().repeat_interleave(G, 1)
        prefix = name.removesuffix(".weight")
        awq[f"{prefix}.qweight"] = awq_pack(q.T)  # [K, M / 8]
        awq[f"{prefix}.qzeros"] = awq_pack(z.T)  # [K / G, M / 8]
        awq[f"{prefix}.scales"] = s.T.contiguous()  # [K / G, M]
    save_file(awq, dst / "model.safetensors")
    save_file(dense, ref / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": G,
        "zero_point": True,
        "version": "GEMM",
    }
    (dst / "config.json").write_text(json.dumps(config))


def test_autoawq_gemm_loads_and_matches(tiny_llama, tmp_path):
    make_awq_folder(tiny_llama, tmp_path / "awq", tmp_path / "ref")
    cpu = torch.device("cpu")
    ours = build_model(open_checkpoint(str(tmp_path / "awq")), cpu, torch.float32)
    ref = build_model(open_checkpoint(str(tmp_path / "ref")), cpu, torch.float32)
    for layer, ref_layer in zip(ours.layers, ref.layers):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            w = layer.get_submodule(name).weight
            assert isinstance(w, CPUInt4Weight) and w.group_size == G  # the CPU kernels' layout
            assert torch.equal(w.dequantize(), ref_layer.get_submodule(name).weight)
    ids = list(range(5, 13 + GEMM_MIN_TOKENS))  # long enough for the exact path: dequantize, then a GEMM
    torch.testing.assert_close(prompt_logits(ours, ids), prompt_logits(ref, ids))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": "gemv"}, "AutoAWQ version 'gemv' is not supported"),
        ({"bits": 3}, "quantization_config.bits is 3"),
        ({"group_size": 96}, "quantization_config.group_size is 96"),
    ],
)
def test_unsupported_autoawq_settings(tiny_llama, tmp_path, change, message):
    make_awq_folder(tiny_llama, tmp_path / "awq", tmp_path / "ref")
    config = json.loads((tmp_path / "awq" / "config.json").read_text())
    config["quantization_config"].update(change)
    (tmp_path / "awq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        open_checkpoint(str(tmp_path / "awq"))
