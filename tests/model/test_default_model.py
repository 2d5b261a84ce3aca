"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1) against Hugging Face transformers' own GGUF loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from perfxllm import LLM, SamplingParams
from perfxllm.engine.model_runner import prompt_logits
from perfxllm.model.loader import build_model, default_model_path, open_checkpoint


@pytest.fixture(scope="module")
def reference():
    path = Path(default_model_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


def test_logits_match_transformers(reference, llm):
    """The architecture, exactly: the GGUF dequantized (as transformers loads it) against transformers. The
    fast path (packed weights, C kernels with int16 activations at up to 40 tokens) within 1e-3 of it."""
    cpu = torch.device("cpu")
    dense = build_model(open_checkpoint(None, dequantize=True), cpu, torch.float32)
    packed = build_model(open_checkpoint(None), cpu, torch.float32)
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 49152, (30 + 40 * seed,), generator=g)
        with torch.no_grad():
            expected = reference(ids.unsqueeze(0)).logits[0]
        for model, tol in ((dense, 1e-4), (packed, 1e-3)):
            got = prompt_logits(model, ids.tolist())
            assert not got.isnan().any()
            assert float((got - expected).norm() / expected.norm()) < tol


def test_greedy_continuations_match_transformers(reference, llm):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,"]
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2
            )[0, len(ids) :].tolist()
        assert out.token_ids == expected


def test_answers_paris(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0)
    )
    assert "Paris" in out[0].text
    assert out[0].finish_reason == "stop"
