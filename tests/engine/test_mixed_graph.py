"""A step with prompt tokens through the mixed-step graphs' static buffers (padding tokens, context-0 decode
rows, empty tiles, a prompt chunk that does not sample), against the eager step. On the CPU the static
forward runs without capture, its attention on the Triton kernels under the interpreter."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined (as tests/kernels/conftest.py does)
pytest.importorskip("triton")

from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine
from perfxllm.engine.mixed_graph import MixedGraphRunner
from perfxllm.engine.model_runner import StepInputs, warm_up_inputs, warm_up_token_counts
from perfxllm.engine.sequence import Sequence
from perfxllm.layers import attention
from perfxllm.sampling_params import SamplingParams

MAX_TOKENS = 48


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def engine_at_mixed_step(model: Path, second_prompt: int) -> tuple[Engine, StepInputs, list[Sequence]]:
    """Three sequences decoding beside a new prompt of 20 tokens and one of second_prompt tokens."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = Engine(
        EngineConfig(
            model=str(model),
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
    return engine, inputs, sampling


@pytest.mark.parametrize("second_prompt", [10, 40])  # 10: 33 tokens padded to 48; 40: a chunk of 25
def test_mixed_step_through_static_buffers_equals_eager_step(tiny_llama, monkeypatch, second_prompt):
    engine, inputs, sampling = engine_at_mixed_step(tiny_llama, second_prompt)
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
    static = engine.model.compute_logits(mixed.run(torch.tensor(inputs.input_ids), inputs)[: len(sampling)])
    assert torch.equal(k_cache[first_slot], kept)
    assert static.shape == eager.shape == (len(sampling), engine.model_config.vocab_size)
    assert rel_err(eager, reference) < 3e-3
    assert rel_err(static, eager) < 1e-3


@pytest.mark.parametrize("static", [False, True])
def test_sampling_rows_padded_to_warmed_up_sizes_give_the_same_logits(tiny_llama, monkeypatch, static):
    """On the GPU lm_head runs over a step's sampling rows padded to one of a few counts, each run once at
    start-up (a count new to cuBLAS can load a kernel, which waits for the GPU): the rows' logits are those
    of the unpadded step, eager and through the mixed-step buffers."""
    engine, inputs, sampling = engine_at_mixed_step(tiny_llama, 10)
    runner = engine.runner
    runner.logit_sizes = None
    reference = runner.execute(inputs)
    if static:
        monkeypatch.setattr(attention, "runs_on_kernels", lambda x: True)
        monkeypatch.setattr(attention.decode_ops_cpu, "available", lambda q: False)
        runner.mixed_graphs = MixedGraphRunner(
            engine.model, 6, MAX_TOKENS, engine.max_model_len, engine.config.block_size, capture=False
        )
    rows_run: list[int] = []
    compute_logits = engine.model.compute_logits
    monkeypatch.setattr(
        engine.model, "compute_logits", lambda h: rows_run.append(len(h)) or compute_logits(h)
    )
    runner.logit_sizes = [2, 6]
    padded = runner.execute(inputs)
    assert rows_run == [6] and padded.shape == reference.shape == (
        len(sampling),
        engine.model_config.vocab_size,
    )
    assert rel_err(padded, reference) < (1e-3 if static else 1e-6)
    runner.warm_up_logits()
    assert rows_run == [6, 2, 6]
    if not static:  # more rows than the largest size (a start-up step can have more than max_num_seqs)
        runner.logit_sizes = [2, 4]
        assert rel_err(runner.execute(inputs), padded) < 1e-3 and rows_run[-1] == len(sampling)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_many_steps_of_different_buckets_follow_the_eager_engine(tiny_llama, monkeypatch, async_scheduling):
    """Arrivals while others decode, chunked prompts, and a small step after a large one (stale buffers of
    the larger bucket): every step's logits, and so every token, as the eager engine's. With async
    scheduling the decodes' input tokens are still on the device when the step is prepared."""
    monkeypatch.setattr(attention, "runs_on_kernels", lambda x: True)
    monkeypatch.setattr(attention.decode_ops_cpu, "available", lambda q: False)
    max_tokens = 200  # buckets 64, 128 and 200
    replays: list[int] = []  # tokens of each step the static runner ran

    def run(static: bool) -> tuple[dict[str, list[int]], list[torch.Tensor]]:
        config = EngineConfig(
            model=str(tiny_llama),
            dtype="float16",
            enforce_eager=True,
            max_num_seqs=6,
            max_num_batched_tokens=max_tokens,
            max_model_len=256,
            async_scheduling=async_scheduling,
        )
        engine = Engine(config)
        if static:
            engine.runner.mixed_graphs = MixedGraphRunner(
                engine.model, 6, max_tokens, engine.max_model_len, config.block_size, capture=False
            )
            mixed = engine.runner.mixed_graphs
            assert mixed.buckets == [64, 128, 200]
            mixed.run = lambda ids, inputs, run=mixed.run: replays.append(len(ids)) or run(ids, inputs)
        logits, execute = [], engine.runner.execute
        engine.runner.execute = lambda *args: logits.append(execute(*args)) or logits[-1]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        arrivals = {0: [40, 7, 3], 2: [150], 5: [2, 33], 9: [1, 60]}
        tokens: dict[str, list[int]] = {}
        for step in range(40):
            for n in arrivals.get(step, []):
                engine.add_request(list(range(5 + step, 5 + step + n)), params, f"{step}-{n}")
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
        assert not engine.has_unfinished()
        return tokens, logits

    eager_tokens, eager_logits = run(False)
    static_tokens, static_logits = run(True)
    assert static_tokens == eager_tokens
    assert max(replays) > 128 and min(replays) <= 64  # the largest bucket, then smaller ones after it
    assert len(static_logits) == len(eager_logits)
    for a, b in zip(static_logits, eager_logits):
        assert a.shape == b.shape and (not a.numel() or rel_err(a, b) < 1e-3)


def test_warm_up_steps_cover_each_power_of_two_of_tokens_above_the_graphs():
    """Every step larger than the mixed-step graphs rounds up (as an int4 matmul buckets its tokens) to a
    count run at start-up."""
    assert warm_up_token_counts(16384, 1024) == [16384, 8192, 4096, 2048]
    assert warm_up_token_counts(3000, 1024) == [3000, 2048]
    assert warm_up_token_counts(2048, 1024) == [2048]
    assert warm_up_token_counts(512, 512) == [512]
    assert warm_up_token_counts(16, 0) == [16, 8, 4, 2, 1]  # no graphs: every count down to one token


def test_engine_on_the_kernels_runs_the_warm_up_steps_at_start(tiny_llama, monkeypatch):
    from perfxllm.engine import engine as engine_module
    from perfxllm.engine.model_runner import ModelRunner

    steps: list[int] = []
    monkeypatch.setattr(engine_module, "runs_on_kernels", lambda x: True)
    monkeypatch.setattr(ModelRunner, "execute", lambda self, inputs: steps.append(len(inputs.input_ids)))
    config = EngineConfig(
        model=str(tiny_llama), enforce_eager=True, max_num_seqs=3, max_num_batched_tokens=300
    )
    Engine(config)
    assert steps == [300, 256, 128, 64, 32, 16, 8, 4, 2, 1]  # no graphs (enforce_eager): every power of two


def test_warm_up_step_writes_no_cache_slot(tiny_llama, monkeypatch):
    """The engine's start-up step of max_num_batched_tokens tokens (prompts of about 256, each shorter than
    the context) runs on the kernels and leaves every cache block as it was."""
    monkeypatch.setattr(attention, "runs_on_kernels", lambda x: True)
    monkeypatch.setattr(attention.decode_ops_cpu, "available", lambda q: False)
    config = EngineConfig(
        model=str(tiny_llama), dtype="float16", enforce_eager=True, max_num_seqs=3, max_model_len=64
    )
    engine = Engine(config)
    inputs = warm_up_inputs(300, config.max_num_seqs, engine.max_model_len, config.block_size)
    assert sum(inputs.query_lens) == len(inputs.input_ids) == 300
    assert len(inputs.query_lens) == 5 and max(inputs.query_lens) < engine.max_model_len  # 3 would not fit
    assert set(inputs.slots) == {-1} and len(inputs.logit_rows) == 5
    layers = engine.model.layers
    for layer in layers:
        layer.self_attn.k_cache.normal_()
        layer.self_attn.v_cache.normal_()
    before = [(layer.self_attn.k_cache.clone(), layer.self_attn.v_cache.clone()) for layer in layers]
    logits = engine.runner.execute(inputs)
    assert logits.shape == (5, engine.model_config.vocab_size) and torch.isfinite(logits).all()
    for layer, (k, v) in zip(layers, before):
        assert torch.equal(layer.self_attn.k_cache, k) and torch.equal(layer.self_attn.v_cache, v)
