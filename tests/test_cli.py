"""The command line: real subprocesses; bad input gets one clear line on stderr and exit code 2."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_CONFIG, save_tiny_model


def perfxllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "perfxllm", *args], capture_output=True, text=True, timeout=300
    )


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("perfxllm: error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_generate_greedy_on_tiny_model(tiny_llama):
    args = ("generate", "-m", str(tiny_llama), "--temperature", "0", "--max-tokens", "8", "The quick")
    r = perfxllm(*args)
    assert r.returncode == 0, r.stderr
    assert "tokens/s" in r.stderr
    overlapped = perfxllm(*args, "--async-scheduling")
    assert overlapped.returncode == 0, overlapped.stderr
    assert overlapped.stdout == r.stdout


def test_missing_path():
    assert_clean_error(perfxllm("generate", "-m", "/no/such/model", "hi"), "not found", "/no/such/model")


def test_truncated_safetensors(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_clean_error(perfxllm("generate", "-m", str(folder), "hi"), "model.safetensors")


def test_garbage_safetensors_header(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    assert_clean_error(perfxllm("info", str(folder)), "model.safetensors")


def test_unsupported_architecture(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GemmaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    assert_clean_error(perfxllm("info", str(folder)), "GemmaForCausalLM")


def test_missing_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny_model(tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    assert_clean_error(perfxllm("info", str(folder)), "model.layers.1.mlp.down_proj.weight")


def test_not_a_model(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    assert_clean_error(perfxllm("info", str(junk)), "neither")


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00" + b"\x00" * 8, b"\x00" * 1000])
def test_corrupt_gguf(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    assert_clean_error(perfxllm("info", str(bad)), "bad.gguf")


def test_prompt_longer_than_context(tiny_llama):
    r = perfxllm("generate", "-m", str(tiny_llama), "--max-model-len", "16", "word " * 100)
    assert_clean_error(r, "context")


def test_bad_sampling_value(tiny_llama):
    assert_clean_error(perfxllm("generate", "-m", str(tiny_llama), "--top-p", "0", "hi"), "top_p")


def test_unknown_dtype(tiny_llama):
    assert_clean_error(perfxllm("generate", "-m", str(tiny_llama), "--dtype", "float8", "hi"), "float8")


def test_info_describes_model(tiny_llama):
    r = perfxllm("info", str(tiny_llama))
    assert r.returncode == 0, r.stderr
    assert "LlamaForCausalLM" in r.stdout and "weights" in r.stdout


def test_default_model_path_is_found():
    from perfxllm.model.loader import default_model_path

    assert Path(default_model_path()).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark would run")
def test_bench_kernels_options_parse_and_it_asks_for_a_gpu(tmp_path):
    r = perfxllm("bench", "kernels", "--out-dir", str(tmp_path), "--only", "w4")
    assert_clean_error(r, "needs a CUDA GPU")


def test_unknown_device(tiny_llama):
    assert_clean_error(perfxllm("generate", "-m", str(tiny_llama), "--device", "nonsense", "hi"), "nonsense")
    assert_clean_error(perfxllm("generate", "-m", str(tiny_llama), "--device", "meta", "hi"), "meta")


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--port", "70000"),
        ("eval", "ppl", "--ctx", "0"),
        ("quantize", "-o", "out", "--n-samples", "0"),
        ("bench", "e2e", "--repeats", "0"),
        ("bench", "e2e", "--threads", "-1"),
    ],
)
def test_out_of_range_option_is_a_usage_error(args):
    r = perfxllm(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "must be" in r.stderr.splitlines()[-1]


def test_quantize_refuses_an_output_that_is_a_file_before_quantizing(tiny_llama, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert_clean_error(perfxllm("quantize", str(tiny_llama), "-o", str(taken), "--method", "rtn"), "taken")


def test_int4_on_load_of_a_model_whose_widths_take_no_group(tmp_path):
    folder = save_tiny_model(tmp_path / "m", intermediate_size=100)
    r = perfxllm("generate", "-m", str(folder), "--quantization", "int4", "hi")
    assert_clean_error(r, "not a multiple of 32")


def test_prompt_bytes_that_are_not_utf8(tiny_llama):
    r = subprocess.run(
        [sys.executable, "-m", "perfxllm", "generate", "-m", str(tiny_llama), "-n", "2", b"caf\xe9"],
        capture_output=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr.decode()


def test_eval_record_that_is_not_json_is_refused_before_the_evaluation(tiny_llama, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not json")
    assert_clean_error(perfxllm("eval", "ppl", str(tiny_llama), "--record", str(notes)), "notes.txt")


def test_gguf_of_a_billion_layers_is_one_line_not_a_hang(tmp_path):
    config, path = tmp_path / "config.json", tmp_path / "t.gguf"
    config.write_text(json.dumps({**TINY_CONFIG, "num_hidden_layers": 1}))
    assert perfxllm("export-gguf", "--random-weights", str(config), "-o", str(path)).returncode == 0
    key = struct.pack("<Q", 17) + b"llama.block_count" + struct.pack("<I", 4)  # a uint32 value follows
    path.write_bytes(path.read_bytes().replace(key + struct.pack("<I", 1), key + struct.pack("<I", 10**9)))
    assert_clean_error(perfxllm("info", str(path)), "llama.block_count is 1000000000")


def test_estimate_of_ten_million_layers_is_one_line_not_a_hang(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY_CONFIG, "num_hidden_layers": 10**7}))
    assert_clean_error(perfxllm("info", "--estimate", str(config)), "num_hidden_layers is 10000000")


def test_random_weights_config_that_is_not_utf8(tmp_path):
    config = tmp_path / "bad.json"
    config.write_bytes(b'{"vocab_size": "\xff"}')
    assert_clean_error(perfxllm("info", "--random-weights", str(config)), "bad.json is not valid JSON")


def test_broken_chat_template_fails_chat_prompts_only(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    args = ("generate", "-m", str(folder), "-n", "2", "hi")
    assert perfxllm(*args).returncode == 0
    assert_clean_error(perfxllm(*args, "--chat"), "chat template is invalid")
