"""The engine's hand-off to asyncio: outputs that pile up for a slow reader are read as one."""

from __future__ import annotations

import asyncio

from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine
from perfxllm.sampling_params import SamplingParams
from perfxllm.server.async_engine import AsyncEngine


def test_a_reader_that_falls_behind_gets_the_piled_up_tokens_in_one_output(tiny_model_dir):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    prompt = [5, 9, 13, 2, 7]

    async def read(engine: AsyncEngine, rid: str, wait_first: bool) -> list:
        stream = engine.submit(rid, [prompt], [params])
        while wait_first and not any(out.finished for _, out in stream._pending):
            await asyncio.sleep(0.01)  # the engine runs the whole request before anyone reads
        return [out async for _, out in stream]

    async def main() -> tuple[list, list]:
        engine = AsyncEngine.on_thread(Engine(EngineConfig(model=str(tiny_model_dir))), 8)
        await engine.start()
        try:
            return await read(engine, "prompt-reader", False), await read(engine, "slow-reader", True)
        finally:
            await engine.close()

    prompt_outputs, slow_outputs = asyncio.run(main())
    assert len(slow_outputs) == 1 < len(prompt_outputs)
    merged = slow_outputs[0]
    assert merged.finished and merged.finish_reason == "length" and merged.num_output_tokens == 12
    assert merged.token_ids == [t for out in prompt_outputs for t in out.token_ids]
    assert merged.text == "".join(out.text for out in prompt_outputs)
    assert [s.token_id for s in merged.logprobs] == merged.token_ids
