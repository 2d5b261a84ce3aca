"""export-gguf: a random model written as GGUF loads back as the same model, and llama.cpp runs it."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import TINY_CONFIG

from perfxllm import LLM
from perfxllm.engine.model_runner import prompt_logits
from perfxllm.model.gguf_loader import load_gguf
from perfxllm.model.gguf_writer import write_gguf
from perfxllm.model.loader import open_checkpoint

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    **TINY_CONFIG,
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
IDS = [5, 17, 200, 299, 3, 42, 7, 150]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def logits(**model) -> np.ndarray:
    return prompt_logits(LLM(device="cpu", dtype="float32", **model).engine.model, IDS).numpy()


def test_f32_file_is_the_same_model(config_path, tmp_path):
    out = tmp_path / "m.gguf"
    write_gguf(open_checkpoint(None, config_path), out, "f32")
    np.testing.assert_array_equal(logits(model=str(out)), logits(random_weights=config_path))
    tok = LLM(str(out), device="cpu").tokenizer
    assert tok.encode("hello a ba", add_bos=False) == [71, 68, 75, 75, 78, 220, 64, 220, 65, 64]


def test_q4_0_file_holds_gguf_quantized_weights(config_path, tmp_path):
    out = tmp_path / "m.gguf"
    write_gguf(open_checkpoint(None, config_path), out, "q4_0")
    loaded = load_gguf(str(out))
    for name, want in open_checkpoint(None, config_path).source.iter_tensors():
        t = loaded.raw_tensor(name)
        if want.dim() == 2:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            q = gguf.quants.quantize(want.numpy(), gguf.GGMLQuantizationType.Q4_0)
            want = torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q4_0))
        torch.testing.assert_close(loaded.tensor(name), want, rtol=0, atol=0)


def test_llama_cpp_runs_it(config_path, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp baselines need the bench extra")
    out = tmp_path / "m.gguf"
    write_gguf(open_checkpoint(None, config_path), out, "f32")
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(IDS)
    ref = np.array(llm.scores[: len(IDS)])
    ours = logits(model=str(out))
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 2e-3  # llama.cpp keeps K/V in fp16
    assert llm.tokenize(b"hello a ba", add_bos=False) == [71, 68, 75, 75, 78, 220, 64, 220, 65, 64]


def test_unknown_type_is_refused(config_path, tmp_path):
    from perfxllm.errors import PerfxError

    with pytest.raises(PerfxError, match="unknown GGUF type"):
        write_gguf(open_checkpoint(None, config_path), Path(tmp_path) / "m.gguf", "q2_k")


def test_a_list_of_eos_ids_writes_the_first(tmp_path):
    """config.json may list several end tokens (Llama 3); a GGUF file holds one."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**CONFIG, "eos_token_id": [2, 7]}))
    out = tmp_path / "m.gguf"
    write_gguf(open_checkpoint(None, str(path)), out, "f32")
    assert open_checkpoint(str(out)).config.eos_token_ids == [2]
