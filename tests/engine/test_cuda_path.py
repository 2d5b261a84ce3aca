"""The GPU fast path (Triton kernels, CUDA-graph decode) against the torch reference. Needs a CUDA GPU: run
on the GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from perfxllm import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time there"]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
# fp16 rounds differently from the float32 reference, and a random model's top two logits can be close:
# the greedy continuations must agree at least this far before they may part.
FP16_MIN_AGREEMENT = 8


def greedy_tokens(**options) -> list[list[int]]:
    llm = LLM(random_weights="smollm2-135m", max_model_len=512, **options)
    return [c.token_ids for c in llm.generate(PROMPTS, GREEDY)]


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


@pytest.fixture(scope="module")
def cpu_reference() -> list[list[int]]:
    return greedy_tokens(device="cpu", dtype="float32")


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_float32_on_cuda_equals_cpu(cpu_reference, async_scheduling):
    assert greedy_tokens(device="cuda", dtype="float32", async_scheduling=async_scheduling) == cpu_reference


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_fast_path_follows_cpu_reference(cpu_reference, quantization):
    reference = cpu_reference
    if quantization:
        reference = greedy_tokens(device="cpu", dtype="float32", quantization=quantization)
    fast = greedy_tokens(device="cuda", dtype="float16", quantization=quantization)
    agreement = [first_divergence(a, b) for a, b in zip(reference, fast)]
    assert min(agreement) >= FP16_MIN_AGREEMENT, agreement


def test_graph_decode_equals_eager_decode():
    graphs = LLM(random_weights="smollm2-135m", device="cuda", dtype="float16", max_model_len=512)
    assert graphs.engine.runner.graphs is not None
    eager = LLM(
        random_weights="smollm2-135m", device="cuda", dtype="float16", max_model_len=512, enforce_eager=True
    )
    a = [c.token_ids for c in graphs.generate(PROMPTS, GREEDY)]
    b = [c.token_ids for c in eager.generate(PROMPTS, GREEDY)]
    assert [first_divergence(x, y) for x, y in zip(a, b)] == [32] * len(PROMPTS)


def test_mixed_graph_steps_equal_eager_steps():
    """Prompts that arrive while others decode: their steps (decodes beside a prompt) replay the mixed-step
    graphs and follow the eager engine's tokens (padded to a bucket, the matmuls may round differently)."""
    from perfxllm.engine.config import EngineConfig
    from perfxllm.engine.engine import Engine

    def tokens(enforce_eager: bool) -> list[list[int]]:
        config = EngineConfig(
            random_weights="smollm2-135m",
            device="cuda",
            dtype="float16",
            max_model_len=512,
            enforce_eager=enforce_eager,
        )
        engine = Engine(config)
        assert (engine.runner.mixed_graphs is None) == enforce_eager
        out: dict[str, list[int]] = {}
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(engine.tokenizer.encode(prompt * (i + 1)), GREEDY, f"r{i}")
            for _ in range(3):  # the next prompt joins while these decode
                for o in engine.step():
                    out.setdefault(o.request_id, []).extend(o.token_ids)
        while engine.has_unfinished():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.token_ids)
        return [out[f"r{i}"] for i in range(len(PROMPTS))]

    graphs, eager = tokens(False), tokens(True)
    assert min(first_divergence(x, y) for x, y in zip(graphs, eager)) >= FP16_MIN_AGREEMENT
