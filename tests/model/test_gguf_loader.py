"""The GGUF loader on tiny GGUF files written here (llama with GQA, qwen2 with biases) and on the default model."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from tokenizers import pre_tokenizers

from perfxllm.errors import ModelLoadError, UnsupportedError
from perfxllm.layers.rotary import rope_cos_sin_cache
from perfxllm.model.config import ModelConfig
from perfxllm.model.gguf_loader import GGUFCheckpoint, load_gguf
from perfxllm.model.gguf_reader import GGUFTensor

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 256, 4, 2, 64, 128, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = sorted(pre_tokenizers.ByteLevel.alphabet()) + SPECIAL  # byte-level BPE without merges
# The GGUF tensor (llama.cpp name suffix) of each Hugging Face module, and the types it is written in.
MODULES = {
    "self_attn.q_proj": ("attn_q", Q.F16),
    "self_attn.k_proj": ("attn_k", Q.Q4_0),
    "self_attn.v_proj": ("attn_v", Q.Q4_1),
    "self_attn.o_proj": ("attn_output", Q.Q8_0),
    "mlp.gate_proj": ("ffn_gate", Q.F32),
    "mlp.up_proj": ("ffn_up", Q.Q4_0),
    "mlp.down_proj": ("ffn_down", Q.Q4_1),
}


def reference_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rotate_half halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(tied: bool, bias: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float16-representable weights under Hugging Face names."""
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float16).astype(np.float32)

    shapes = {
        "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj": (FFN, HIDDEN),
        "mlp.up_proj": (FFN, HIDDEN),
        "mlp.down_proj": (HIDDEN, FFN),
    }
    w = {"model.embed_tokens.weight": rand(len(TOKENS), HIDDEN), "model.norm.weight": rand(HIDDEN)}
    if not tied:
        w["lm_head.weight"] = rand(len(TOKENS), HIDDEN)
    for i in range(LAYERS):
        w[f"model.layers.{i}.input_layernorm.weight"] = rand(HIDDEN)
        w[f"model.layers.{i}.post_attention_layernorm.weight"] = rand(HIDDEN)
        for module, shape in shapes.items():
            w[f"model.layers.{i}.{module}.weight"] = rand(*shape)
        if bias:
            for p in ("q", "k", "v"):
                w[f"model.layers.{i}.self_attn.{p}_proj.bias"] = rand(shapes[f"self_attn.{p}_proj"][0])
    return w


def gguf_name(hf_name: str) -> str:
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, *module, param = hf_name.split(".")
    module = ".".join(module)
    norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    return f"blk.{layer}.{norms.get(module) or MODULES[module][0]}.{param}"


def stored(hf_name: str, w: np.ndarray, arch: str) -> tuple[np.ndarray, Q]:
    """What llama.cpp's converter writes: the array (q/k permuted for llama) and its tensor type."""
    module = ".".join(hf_name.split(".")[3:-1])
    qtype = MODULES[module][1] if module in MODULES and hf_name.endswith(".weight") else Q.F32
    if hf_name == "model.embed_tokens.weight":
        qtype = Q.Q8_0
    if hf_name == "lm_head.weight":
        qtype = Q.BF16
    if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
        w = reference_permute(w, HEADS if module == "self_attn.q_proj" else KV_HEADS)
    return w, qtype


def write_model(write_gguf, path: Path, arch: str, weights: dict[str, np.ndarray], **extra) -> Path:
    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(TOKENS)
        writer.add_token_types([1] * (len(TOKENS) - len(SPECIAL)) + [3] * len(SPECIAL))
        writer.add_token_merges([])
        writer.add_bos_token_id(TOKENS.index("<|im_start|>"))
        writer.add_eos_token_id(TOKENS.index("<|im_end|>"))
        writer.add_chat_template("{{ messages[0]['content'] }}")
        for hf_name, w in weights.items():
            array, qtype = stored(hf_name, w, arch)
            if qtype == Q.F32:
                writer.add_tensor(gguf_name(hf_name), array)
            elif qtype == Q.F16:
                writer.add_tensor(gguf_name(hf_name), array.astype(np.float16))
            else:
                writer.add_tensor(gguf_name(hf_name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        for name, array in extra.items():
            writer.add_tensor(name, array)

    hparams = dict(
        embedding_length=HIDDEN,
        block_count=LAYERS,
        feed_forward_length=FFN,
        head_count=HEADS,
        head_count_kv=KV_HEADS,
        rope_freq_base=500000.0 if arch == "llama" else 1000000.0,
        rope_dimension_count=HEAD_DIM,
    )
    return write_gguf(path, arch, fill, **hparams)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, write_gguf) -> tuple[GGUFCheckpoint, dict[str, np.ndarray]]:
    weights = hf_weights(tied=False, bias=True)
    path = write_model(write_gguf, tmp_path_factory.mktemp("llama") / "tiny.gguf", "llama", weights)
    return load_gguf(str(path)), weights


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, write_gguf) -> tuple[GGUFCheckpoint, dict[str, np.ndarray]]:
    weights = hf_weights(tied=True, bias=True)
    path = write_model(write_gguf, tmp_path_factory.mktemp("qwen2") / "tiny.gguf", "qwen2", weights)
    return load_gguf(str(path)), weights


def test_llama_config(llama) -> None:
    ckpt, _ = llama
    c = ckpt.config
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert c["vocab_size"] == len(TOKENS)
    assert (c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"]) == (500000.0, 1e-5, 256)
    assert c["rope_scaling"] is None
    assert c["tie_word_embeddings"] is False and c["attention_bias"] is True  # it has q/k/v biases
    assert (c["bos_token_id"], c["eos_token_id"]) == (
        TOKENS.index("<|im_start|>"),
        TOKENS.index("<|im_end|>"),
    )
    assert ModelConfig.from_hf(c).num_kv_heads == KV_HEADS
    tc = ckpt.tokenizer_config
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert tc["chat_template"] == "{{ messages[0]['content'] }}"
    assert tc["eos_token_ids"] == [TOKENS.index("<|endoftext|>"), TOKENS.index("<|im_end|>")]


def test_qwen2_config(qwen2) -> None:
    c = qwen2[0].config
    assert c["architectures"] == ["Qwen2ForCausalLM"]
    assert c["attention_bias"] is True and c["tie_word_embeddings"] is True
    assert c["rope_theta"] == 1000000.0


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_names_and_shapes(model: str, request) -> None:
    ckpt, weights = request.getfixturevalue(model)
    assert sorted(ckpt.tensor_names()) == sorted(weights)
    tensors = dict(ckpt.iter_tensors())
    assert list(tensors) == ckpt.tensor_names()
    for name, w in weights.items():
        assert tensors[name].shape == w.shape, name
        assert tensors[name].dtype == torch.float32


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_tensors_are_the_dequantized_data(model: str, request) -> None:
    """Every tensor equals gguf's own dequantization of the stored data, un-permuted where llama permutes."""
    ckpt, weights = request.getfixturevalue(model)
    for name, tensor in ckpt.iter_tensors():
        raw = ckpt.raw_tensor(name)
        expected = gguf.quants.dequantize(raw.data, raw.tensor_type).reshape(weights[name].shape)
        if model == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = HEADS if ".q_proj." in name else KV_HEADS
            assert np.array_equal(reference_permute(tensor.numpy(), heads), expected), name
        else:
            assert np.array_equal(tensor.numpy(), expected), name


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_tensors_match_the_original_weights(model: str, request) -> None:
    """Exact for float types, within quantization error otherwise: so q/k come back un-permuted."""
    ckpt, weights = request.getfixturevalue(model)
    for name, tensor in ckpt.iter_tensors():
        w = torch.from_numpy(weights[name])
        if ckpt.raw_tensor(name).tensor_type in (Q.F32, Q.F16, Q.BF16):
            torch.testing.assert_close(tensor, w, rtol=1e-2 if name == "lm_head.weight" else 0, atol=0)
        else:
            assert float((tensor - w).norm() / w.norm()) < 0.2, name


def test_rope_row_order(llama) -> None:
    ckpt, _ = llama
    order = ckpt.rope_row_order("model.layers.0.self_attn.k_proj.weight")
    rows = np.arange(KV_HEADS * HEAD_DIM)
    assert np.array_equal(reference_permute(rows, KV_HEADS)[order], rows)
    assert ckpt.rope_row_order("model.layers.0.self_attn.v_proj.weight") is None


def test_iter_tensors_dtype(qwen2) -> None:
    _, tensor = next(qwen2[0].iter_tensors(torch.bfloat16))
    assert tensor.dtype == torch.bfloat16


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path: Path, write_gguf) -> None:
    """llama.cpp keeps only per-frequency factors (rope_freqs.weight, computed as convert_hf_to_gguf.py does);
    the recovered parameters must give the same rotary frequencies."""
    theta = 500000.0
    original = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    freqs = 1.0 / theta ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    wavelen = 2 * np.pi / freqs
    ctx = original["original_max_position_embeddings"]
    smooth = (ctx / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(
        wavelen < ctx / 4.0, 1.0, np.where(wavelen > ctx / 1.0, 8.0, 1 / ((1 - smooth) / 8.0 + smooth))
    ).astype(np.float32)
    path = write_model(
        write_gguf,
        tmp_path / "l3.gguf",
        "llama",
        hf_weights(tied=True, bias=False),
        **{"rope_freqs.weight": factors},
    )
    ckpt = load_gguf(str(path))
    scaling = ckpt.config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    torch.testing.assert_close(
        rope_cos_sin_cache(HEAD_DIM, 256, theta, scaling), rope_cos_sin_cache(HEAD_DIM, 256, theta, original)
    )
    assert "rope_freqs.weight" not in ckpt.tensor_names()


def test_default_model(smollm2: GGUFCheckpoint) -> None:
    c = smollm2.config
    assert c["architectures"] == ["LlamaForCausalLM"]
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["vocab_size"], c["rope_theta"], c["rms_norm_eps"]) == (49152, 100000.0, 1e-5)
    assert c["tie_word_embeddings"] is True and c["rope_scaling"] is None
    names = smollm2.tensor_names()
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names
    shapes = {}
    for name, tensor in smollm2.iter_tensors():
        shapes[name] = tuple(tensor.shape)
        assert np.isfinite(tensor.numpy()).all(), name
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.layers.29.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (576, 1536)
    assert smollm2.raw_tensor("model.layers.0.mlp.up_proj.weight").tensor_type == Q.Q4_1


# Bad inputs: each raises perfxllm's own error with one clear line.


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as e:
        load_gguf(str(tmp_path / "absent.gguf"))
    assert "not found" in one_line(e)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file, not a model")
    with pytest.raises(ModelLoadError) as e:
        load_gguf(str(path))
    assert "not a GGUF file" in one_line(e)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.01])
def test_truncated_file(tmp_path: Path, write_gguf, keep: float) -> None:
    path = write_model(write_gguf, tmp_path / "full.gguf", "qwen2", hf_weights(tied=True, bias=True))
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError) as e:
        load_gguf(str(cut))
    assert "truncated" in one_line(e)


def test_unsupported_architecture(tmp_path: Path, write_gguf) -> None:
    path = write_gguf(tmp_path / "g.gguf", "gemma2")
    with pytest.raises(UnsupportedError) as e:
        load_gguf(str(path))
    assert one_line(e) == "unsupported architecture 'gemma2' (supported: llama, qwen2)"


def test_unsupported_tensor_type(tmp_path: Path, write_gguf) -> None:
    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
        writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), np.int8))

    path = write_gguf(tmp_path / "i8.gguf", fill=fill)
    with pytest.raises(UnsupportedError) as e:
        load_gguf(str(path))
    message = one_line(e)
    assert "'blk.0.attn_q.weight'" in message and "I8" in message


def test_unsupported_tensor(tmp_path: Path, write_gguf) -> None:
    path = write_gguf(
        tmp_path / "moe.gguf",
        fill=lambda w: w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((2, 64, 32), np.float32)),
    )
    with pytest.raises(UnsupportedError) as e:
        load_gguf(str(path))
    assert "'blk.0.ffn_gate_exps.weight'" in one_line(e)


def test_missing_hyperparameter(tmp_path: Path, write_gguf) -> None:
    path = write_gguf(tmp_path / "h.gguf", fill=lambda w: w.add_token_list(["a"]))
    data = path.read_bytes().replace(b"llama.block_count", b"llama.block_xount")
    path.write_bytes(data)
    with pytest.raises(ModelLoadError) as e:
        load_gguf(str(path))
    one_line(e)


def test_unknown_tensor_name_raises(llama) -> None:
    with pytest.raises(ModelLoadError):
        llama[0].raw_tensor("model.layers.9.self_attn.q_proj.weight")


def vocabulary(writer: gguf.GGUFWriter) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)


@pytest.mark.parametrize(
    ("hparams", "needle"),
    [
        ({"head_count": 0}, "llama.attention.head_count is 0, not an integer from 1 to 1024"),
        ({"block_count": 10**9}, "llama.block_count is 1000000000, not an integer from 1 to 1024"),
        (
            {"context_length": 2**32 - 1},
            "llama.context_length is 4294967295, not an integer from 1 to 4194304",
        ),
    ],
    ids=["no heads", "a billion layers", "a context of 2**32 - 1"],
)
def test_hyperparameter_out_of_range(tmp_path: Path, write_gguf, hparams, needle) -> None:
    path = write_gguf(tmp_path / "h.gguf", fill=vocabulary, **hparams)
    with pytest.raises(ModelLoadError) as e:
        load_gguf(str(path))
    assert needle in one_line(e)


LINEAR = gguf.RopeScalingType.LINEAR


@pytest.mark.parametrize(
    ("add", "needle"),
    [
        (
            lambda w: w.add_float32("tokenizer.ggml.eos_token_id", 2.0),
            "tokenizer.ggml.eos_token_id is 2.0, not an integer",
        ),
        (
            lambda w: w.add_string("tokenizer.ggml.bos_token_id", "1"),
            "tokenizer.ggml.bos_token_id is '1', not an integer",
        ),
        (
            lambda w: (w.add_rope_scaling_type(LINEAR), w.add_string("llama.rope.scaling.factor", "eight")),
            "llama.rope.scaling.factor is 'eight', not a number",
        ),
        (
            lambda w: (
                w.add_rope_scaling_type(LINEAR),
                w.add_string("llama.rope.scaling.original_context_length", "4k"),
            ),
            "llama.rope.scaling.original_context_length is '4k', not an integer",
        ),
    ],
    ids=["float eos id", "string bos id", "string rope factor", "string original context"],
)
def test_metadata_of_the_wrong_type(tmp_path: Path, write_gguf, add, needle) -> None:
    path = write_gguf(tmp_path / "m.gguf", fill=lambda w: (vocabulary(w), add(w)))
    with pytest.raises(ModelLoadError) as e:
        load_gguf(str(path))
    assert needle in one_line(e)


def test_architecture_that_is_an_array(tmp_path: Path, write_gguf, patch_gguf) -> None:
    path = write_gguf(tmp_path / "a.gguf", fill=vocabulary)
    llama = struct.pack("<Q", 5) + b"llama"
    patch_gguf(
        path, "general.architecture", struct.pack("<I", 8) + llama, struct.pack("<IIQ", 9, 8, 1) + llama
    )
    with pytest.raises(ModelLoadError) as e:
        load_gguf(str(path))
    assert one_line(e) == "GGUF metadata general.architecture is ['llama'], not a string"


@pytest.mark.parametrize(
    ("block_count", "needle"),
    [
        (3, "is 3, but the file has no blk.2 tensors (2 blocks in all)"),
        (1, "is 1, but the file has blk.1 tensors"),
    ],
)
def test_block_count_is_checked_against_the_tensors(
    tmp_path: Path, write_gguf, patch_gguf, block_count: int, needle: str
) -> None:
    path = write_model(write_gguf, tmp_path / "b.gguf", "llama", hf_weights(tied=True, bias=False))
    patch_gguf(path, "llama.block_count", struct.pack("<II", 4, LAYERS), struct.pack("<II", 4, block_count))
    with pytest.raises(ModelLoadError) as e:
        load_gguf(str(path))
    assert one_line(e) == f"GGUF metadata llama.block_count {needle}"


def test_rotary_projection_that_is_not_whole_heads_is_named() -> None:
    name = "model.layers.0.self_attn.k_proj.weight"
    k = GGUFTensor(name, Q.F32, (HIDDEN, 34), 0, HIDDEN * 34 * 4, np.zeros((34, HIDDEN * 4), np.uint8))
    config = {"model_type": "llama", "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM}
    ckpt = GGUFCheckpoint("k.gguf", config, None, {}, {name: k})
    with pytest.raises(ModelLoadError) as e:
        ckpt.rope_row_order(name)  # llama.cpp's rotary row order is undone head by head
    assert one_line(e) == f"{name} has 34 rows, expected 2 heads of 64"
