"""Engine settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from perfxllm.errors import PerfxError


@dataclass
class EngineConfig:
    model: str | None = None  # None: the default model
    random_weights: str | None = (
        None  # a preset (llama2-7b, ...) or config.json: random weights of that shape
    )
    quantization: str | None = None  # int4 | int8: round-to-nearest at load (see perfxllm.quant.on_load)
    device: str = "auto"  # auto | cpu | cuda[:N]
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_model_len: int | None = None  # None: the model's context, capped at 8192
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per step: chunked prefill splits longer prompts
    block_size: int = 16
    kv_cache_memory_gb: float | None = None  # None: 90% of free GPU memory, or enough for the CPU's batch
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1  # processes (GPUs) the model is sharded over
    enforce_eager: bool = False  # True: decode through the module tree, not the CUDA graphs / CPU C loop
    # A step's host work (the previous step's outputs, this one's inputs) runs while the device computes,
    # and outputs come a step later. None: on the GPU, where the device runs behind the host.
    async_scheduling: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise PerfxError("tensor_parallel_size must be at least 1")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.block_size < 1:
            raise PerfxError("max_num_seqs, max_num_batched_tokens and block_size must be positive")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise PerfxError("max_model_len must be at least 2")
