"""The C decode loop of a quantized model on the CPU against the module tree it replaces."""

from __future__ import annotations

import pytest
import torch

from perfxllm import LLM, SamplingParams
from perfxllm.engine.cpu_graph import CPUGraphRunner


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_same_logits_and_tokens_as_the_module_tree(tiny_llama, async_scheduling):
    graph = LLM(
        str(tiny_llama), quantization="int4", device="cpu", max_num_seqs=4, async_scheduling=async_scheduling
    )
    eager = LLM(str(tiny_llama), quantization="int4", device="cpu", max_num_seqs=4, enforce_eager=True)
    assert isinstance(graph.engine.runner.graphs, CPUGraphRunner) and eager.engine.runner.graphs is None

    prompts = ["The quick brown fox", "Paris is", "def main():\n    return 42\n" * 3]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    for ours, ref in zip(graph.generate(prompts, params), eager.generate(prompts, params)):
        assert ours.token_ids == ref.token_ids
        got = torch.tensor([lp.logprob for lp in ours.logprobs])
        want = torch.tensor([lp.logprob for lp in ref.logprobs])
        assert not got.isnan().any() and torch.allclose(got, want, atol=1e-4)
