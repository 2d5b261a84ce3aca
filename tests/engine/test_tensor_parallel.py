"""Tensor parallelism on the CPU: two gloo processes give the logits and the tokens of one process."""

from __future__ import annotations

import pytest
import torch

from perfxllm import LLM, SamplingParams
from perfxllm.layers.linear import select_columns
from perfxllm.quant.rtn import quantize_int4, quantize_int8

PROMPTS = ["The quick brown fox", "Paris is", "def main():"]
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=5)


def run(model: str, **options) -> list:
    llm = LLM(model, device="cpu", dtype="float32", **options)
    try:
        return llm.generate(PROMPTS, PARAMS)
    finally:
        llm.engine.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_ranks_equal_one_process(tmp_path, arch):
    from tiny_models import save_tiny_model

    model = str(save_tiny_model(tmp_path / arch, arch=arch, tie_word_embeddings=arch == "qwen2"))
    single, sharded = run(model), run(model, tensor_parallel_size=2)
    for a, b in zip(single, sharded):
        assert a.token_ids == b.token_ids
        got = torch.tensor([s.logprob for s in b.logprobs])
        want = torch.tensor([s.logprob for s in a.logprobs])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for x, y in zip(a.logprobs, b.logprobs):
            assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]


def test_int4_columns_are_cut_along_whole_groups():
    w = torch.randn(8, 256)
    q = quantize_int4(w, 64)
    half = select_columns(q, 128, 256)
    torch.testing.assert_close(half.dequantize(), q.dequantize()[:, 128:])
    with pytest.raises(ValueError, match="groups of 64"):
        select_columns(q, 96, 256)
    q8 = quantize_int8(w)
    torch.testing.assert_close(select_columns(q8, 10, 200).dequantize(), q8.dequantize()[:, 10:200])
