"""The model against Hugging Face transformers on tiny random models: logits in fp32, greedy continuations."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import save_tiny_model

from perfxllm import LLM, SamplingParams
from perfxllm.engine.model_runner import prompt_logits
from perfxllm.model.loader import build_model, open_checkpoint

CASES = {
    "llama-gqa-untied": ("llama", {}),
    "llama-tied-mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama3-rope-scaling": (
        "llama",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2-bias": ("qwen2", {}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": None}),
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in output"
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=list(CASES))
def model_dir(request, tmp_path_factory):
    arch, overrides = CASES[request.param]
    return save_tiny_model(
        tmp_path_factory.mktemp(request.param), arch=arch, seed=len(request.param), **overrides
    )


def test_logits_match_transformers(model_dir):
    ckpt = open_checkpoint(str(model_dir))
    ours = build_model(ckpt, torch.device("cpu"), torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for seed in range(3):  # fresh random inputs of ragged lengths, past the llama3 scaling's original context
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(
            0, ckpt.config.vocab_size, (int(torch.randint(5, 120, (1,), generator=g)),), generator=g
        )
        with torch.no_grad():
            expected = ref(ids.unsqueeze(0)).logits[0].float()
        got = prompt_logits(ours, ids.tolist())
        assert relative_error(got, expected) < 1e-4


def test_greedy_continuation_matches_transformers(model_dir):
    llm = LLM(str(model_dir))
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = ["The quick brown fox", "héllo 世界", "def main():\n    return"]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    batched = llm.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = ref.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(ids) :].tolist()
        assert out.token_ids == expected
        assert llm.generate(prompt, params)[0].token_ids == expected  # alone as in a batch


def test_tokenizer_matches_transformers(tiny_llama):
    ours = open_checkpoint(str(tiny_llama)).tokenizer
    ref = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    texts = [
        "",
        " ",
        "Hello world",
        "naïve café 世界 🙂",
        "12345 + 678 = 13023",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    texts += [f"sample {i}: {'ab' * i} {i**3} ü{i}" for i in range(200)]
    for text in texts:
        assert ours.encode(text) == ref(text)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_sharded_safetensors_load_through_the_index(tmp_path):
    folder = save_tiny_model(tmp_path / "whole")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((folder / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ids = list(range(3, 40))
    whole = prompt_logits(build_model(open_checkpoint(str(folder)), torch.device("cpu"), torch.float32), ids)
    shards = prompt_logits(
        build_model(open_checkpoint(str(sharded)), torch.device("cpu"), torch.float32), ids
    )
    assert torch.equal(whole, shards)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu_is_close(tiny_llama, dtype):
    ckpt = open_checkpoint(str(tiny_llama))
    ids = list(range(3, 60))
    full = prompt_logits(build_model(ckpt, torch.device("cpu"), torch.float32), ids)
    half = prompt_logits(build_model(open_checkpoint(str(tiny_llama)), torch.device("cpu"), dtype), ids)
    assert relative_error(half, full) < 3e-2
