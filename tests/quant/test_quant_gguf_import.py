"""GGUF Q4_0 / Q4_1 / Q8_0 imported natively: bit-exact with gguf's own dequantization, Q/K rows un-permuted."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import pre_tokenizers

from perfxllm.engine.model_runner import prompt_logits
from perfxllm.kernels.quant_matmul_cpu import GEMM_MIN_TOKENS, CPUInt4Weight, CPUInt8Weight
from perfxllm.model.gguf_loader import GGUFCheckpoint
from perfxllm.model.gguf_reader import GGUFFile
from perfxllm.model.loader import build_model, open_checkpoint
from perfxllm.quant.formats import Int4Weight, Int8Weight
from perfxllm.quant.gguf_native import NativeGGUF, import_gguf_matrix

HIDDEN, FFN, HEADS, KV_HEADS = 64, 128, 4, 2
TOKENS = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "<|im_start|>", "<|im_end|>"]
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# per layer, each projection's stored type: every native type on q and k (whose rows llama.cpp permutes),
# and in layer 1 fused groups of mixed types, which load dense
LAYER_TYPES = [
    dict(zip(GGUF_NAMES, [Q.Q4_0, Q.Q4_0, Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q8_0, Q.Q4_1])),
    dict(zip(GGUF_NAMES, [Q.Q4_1, Q.Q8_0, Q.Q4_1, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_0])),
]
FUSED = {
    "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "self_attn.o_proj": ["self_attn.o_proj"],
    "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.down_proj": ["mlp.down_proj"],
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama's q/k_proj rows: each head's rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], fill=None) -> gguf.GGUFReader:
    writer = gguf.GGUFWriter(str(path), "llama")
    if fill:
        fill(writer)
    for name, (array, qtype) in tensors.items():
        if qtype == Q.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_matrix_import_is_bit_exact(tmp_path, qtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    w[0] = np.abs(w[0])  # Q4_0 then stores a negative scale
    w[1, :32] = 0
    (t,) = write_tensors(tmp_path / "m.gguf", {"w": (w, qtype)}).tensors
    ours = import_gguf_matrix(t)
    assert isinstance(ours, Int8Weight if qtype == Q.Q8_0 else Int4Weight)
    assert ours.group_size == 32 and ours.shape == (48, 96)
    assert np.array_equal(ours.dequantize().numpy(), gguf.quants.dequantize(t.data, t.tensor_type))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """A tiny Llama GGUF as llama.cpp writes it; returns it and the expected (dequantized) HF weights."""
    rng = np.random.default_rng(1)
    shapes = {
        "self_attn.q_proj": (HEADS * 16, HIDDEN),
        "self_attn.k_proj": (KV_HEADS * 16, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * 16, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HEADS * 16),
        "mlp.gate_proj": (FFN, HIDDEN),
        "mlp.up_proj": (FFN, HIDDEN),
        "mlp.down_proj": (HIDDEN, FFN),
    }
    tensors = {
        "token_embd.weight": (rng.standard_normal((len(TOKENS), HIDDEN)).astype(np.float32), Q.Q8_0),
        "output_norm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN).astype(np.float32), Q.F32),
        "output.weight": (0.2 * rng.standard_normal((len(TOKENS), HIDDEN)).astype(np.float32), Q.Q4_0),
    }
    expected = {
        "lm_head.weight": gguf.quants.dequantize(
            gguf.quants.quantize(tensors["output.weight"][0], Q.Q4_0), Q.Q4_0
        )
    }
    for i, types in enumerate(LAYER_TYPES):
        for norm in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{i}.{norm}.weight"] = (
                1 + 0.1 * rng.standard_normal(HIDDEN).astype(np.float32),
                Q.F32,
            )
        for module, qtype in types.items():
            w = (0.2 * rng.standard_normal(shapes[module])).astype(np.float32)
            # Blocks are row-wise: quantizing permuted rows and un-permuting them is quantizing the rows.
            expected[f"model.layers.{i}.{module}.weight"] = gguf.quants.dequantize(
                gguf.quants.quantize(w, qtype), qtype
            )
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                w = llama_cpp_permute(w, HEADS if module == "self_attn.q_proj" else KV_HEADS)
            tensors[f"blk.{i}.{GGUF_NAMES[module]}.weight"] = (w, qtype)

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_context_length(256)
        writer.add_embedding_length(HIDDEN)
        writer.add_block_count(len(LAYER_TYPES))
        writer.add_feed_forward_length(FFN)
        writer.add_head_count(HEADS)
        writer.add_head_count_kv(KV_HEADS)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_freq_base(10000.0)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(TOKENS)
        writer.add_token_merges([])
        writer.add_bos_token_id(len(TOKENS) - 2)
        writer.add_eos_token_id(len(TOKENS) - 1)

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tensors(path, tensors, fill)
    return path, expected


def test_native_import_of_a_model(model_file):
    """Packed where the file is, bit for bit (through the CPU kernels' layouts, which keep the values), and
    the same logits as the dequantized model."""
    path, expected = model_file
    cpu = torch.device("cpu")
    native = build_model(open_checkpoint(str(path)), cpu, torch.float32)
    dense = build_model(open_checkpoint(str(path), dequantize=True), cpu, torch.float32)
    assert isinstance(native.lm_head.weight, CPUInt4Weight)
    for i, layer in enumerate(native.layers):
        for name, parts in FUSED.items():
            weight = layer.get_submodule(name).weight
            types = {LAYER_TYPES[i][part] for part in parts}
            if len(types) > 1:
                assert isinstance(weight, torch.Tensor), name
            else:
                assert isinstance(weight, CPUInt8Weight if types == {Q.Q8_0} else CPUInt4Weight), name
                weight = weight.dequantize()
            want = np.concatenate([expected[f"model.layers.{i}.{part}.weight"] for part in parts])
            assert np.array_equal(weight.numpy(), want), name
    assert np.array_equal(native.lm_head.weight.dequantize().numpy(), expected["lm_head.weight"])
    ids = list(range(20, 28 + GEMM_MIN_TOKENS))  # long enough for the exact path: dequantize, then a GEMM
    torch.testing.assert_close(prompt_logits(native, ids), prompt_logits(dense, ids), rtol=1e-4, atol=1e-4)


def test_tied_embedding_is_also_a_packed_lm_head():
    """The default model ties lm_head to a Q8_0 embedding: the logits read the Q8_0 bytes, the lookup a
    dense copy of the same values."""
    model = build_model(open_checkpoint(None), torch.device("cpu"), torch.float32)
    assert isinstance(model.lm_head.weight, CPUInt8Weight) and model.lm_head.weight.group_size == 32
    assert torch.equal(model.lm_head.weight.dequantize(), model.embed_tokens.weight)


def test_packed_projection_that_is_not_a_matrix_comes_dense_for_the_shape_check(tmp_path):
    """(The loader then names it: "... has shape (1, 128, 64), expected (128, 64)".)"""
    name = "model.layers.0.mlp.up_proj.weight"
    write_tensors(tmp_path / "m.gguf", {"w": (np.ones((1, FFN, HIDDEN), np.float32), Q.Q8_0)})
    (raw,) = GGUFFile(tmp_path / "m.gguf").tensors
    source = GGUFCheckpoint(str(tmp_path / "m.gguf"), {"model_type": "llama"}, None, {}, {name: raw})
    ((_, weight),) = NativeGGUF(source).iter_tensors()
    assert isinstance(weight, torch.Tensor) and weight.shape == (1, FFN, HIDDEN)
