"""A step with prompt tokens through the mixed-step graphs' static buffers (padding tokens, context-0 decode
rows, empty tiles, a prompt chunk that does not sample), against the eager step. On the CPU the static
forward runs without capture, its attention on the Triton kernels under the interpreter."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined (as tests/kernels/conftest.py does)
pytest.importorskip("triton")

from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine
from perfxllm.engine.mixed_graph import MixedGraphRunner
from perfxllm.layers import attention
from perfxllm.sampling_params import SamplingParams

MAX_TOKENS = 48


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("second_prompt", [10, 40])  # 10: 33 tokens padded to 48; 40: a chunk of 25
def test_mixed_step_through_static_buffers_equals_eager_step(tiny_llama, monkeypatch, second_prompt):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(
        EngineConfig(
            model=str(tiny_llama),
            device=device,
            dtype="float16",
            enforce_eager=True,
            max_num_seqs=6,
            max_num_batched_tokens=MAX_TOKENS,
        )
    )
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for n in (5, 9, 3):
        engine.add_request(list(range(10, 10 + n)), params)
    engine.step()  # the three prompts
    engine.step()  # now decoding
    for n in (20, second_prompt):
        engine.add_request(list(range(30, 30 + n)), params)
    batch = engine.scheduler.schedule()
    inputs, sampling = engine.runner.prepare(batch)
    assert inputs.query_lens[:3] == [1, 1, 1] and len(inputs.query_lens) == 5
    assert len(sampling) == (5 if second_prompt == 10 else 4)

    reference = engine.runner.execute(inputs)  # the torch path on the CPU
    monkeypatch.setattr(attention, "runs_on_kernels", lambda x: True)
    monkeypatch.setattr(attention.decode_ops_cpu, "available", lambda q: False)
    eager = engine.runner.execute(inputs)
    mixed = MixedGraphRunner(
        engine.model, 6, MAX_TOKENS, engine.max_model_len, engine.config.block_size, capture=False
    )
    assert mixed.can_run(len(inputs.input_ids), len(inputs.query_lens))
    # stale buffers from an earlier, longer step: padding tokens must not write where they point
    first_slot = inputs.slots[0] - inputs.positions[0]  # the first token of the first sequence
    mixed.slot_mapping.fill_(first_slot)
    k_cache = engine.model.layers[0].self_attn.k_cache.view(
        -1, *engine.model.layers[0].self_attn.k_cache.shape[2:]
    )
    kept = k_cache[first_slot].clone()
    static = mixed.run(inputs)
    assert torch.equal(k_cache[first_slot], kept)
    assert static.shape == eager.shape == (len(sampling), engine.model_config.vocab_size)
    assert rel_err(eager, reference) < 3e-3
    assert rel_err(static, eager) < 1e-3
