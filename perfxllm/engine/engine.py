"""The engine: requests in, streamed outputs out. The chat app, the Python API and the HTTP server all
drive this one object; `step()` is the whole loop body."""

from __future__ import annotations

import atexit
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from perfxllm.engine import cpu_graph
from perfxllm.engine.block_manager import BlockManager
from perfxllm.engine.config import EngineConfig
from perfxllm.engine.cuda_graph import CUDAGraphRunner, buckets_up_to
from perfxllm.engine.detokenizer import Detokenizer
from perfxllm.engine.kv_cache import KVCache, bytes_per_block
from perfxllm.engine.mixed_graph import MixedGraphRunner
from perfxllm.engine.model_runner import ModelRunner
from perfxllm.engine.sampler import Sample, SampledBatch, Sampler
from perfxllm.engine.scheduler import Scheduler
from perfxllm.engine.sequence import PENDING_TOKEN, Sequence, Status
from perfxllm.errors import PerfxError, RequestError
from perfxllm.kernels import runs_on_kernels
from perfxllm.kernels._common import to_device
from perfxllm.model.loader import Checkpoint, build_model, open_checkpoint, resolve_dtype
from perfxllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from perfxllm.engine.tensor_parallel import TPGroup

log = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    request_id: str
    text: str  # new text since the last output of this request
    token_ids: list[int]  # new tokens since the last output
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[Sample] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # not a device name at all
        dev = torch.device("meta")
    if dev.type not in ("cpu", "cuda"):
        raise PerfxError(f"--device must be auto, cpu or cuda (or cuda:N), got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PerfxError("--device cuda was asked for, but no CUDA GPU is available")
    return dev


def device_tag(device: torch.device) -> str:
    """A short name for result files: cpu, h100, h200, ..."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device)
    for tag in ("h100", "h200", "a100", "l40", "4090"):
        if tag in name.lower():
            return tag
    return name.lower().replace(" ", "-")


def load_checkpoint(config: EngineConfig, device: torch.device) -> Checkpoint:
    ckpt = open_checkpoint(config.model, config.random_weights, device=device)
    if config.quantization:
        from perfxllm.quant.on_load import QuantizeOnLoad

        ckpt.source = QuantizeOnLoad(ckpt, config.quantization)
    return ckpt


def make_runner(
    model: nn.Module, config: EngineConfig, num_blocks: int, max_model_len: int, tp: TPGroup | None = None
) -> ModelRunner:
    """The KV cache, the decode graphs (CUDA graphs on the GPU in half precision, the C decode loop for a
    quantized model on the CPU), the GPU's graphs of steps with prompt tokens, and the runner over them."""
    weight = model.layers[0].input_layernorm.weight
    KVCache(model, num_blocks, config.block_size, weight.dtype, weight.device)
    graphs = mixed = None
    if not config.enforce_eager and runs_on_kernels(weight):
        graphs = CUDAGraphRunner(model, config.max_num_seqs, max_model_len, config.block_size)
        mixed = MixedGraphRunner(
            model, config.max_num_seqs, config.max_num_batched_tokens, max_model_len, config.block_size
        )
    elif not config.enforce_eager and weight.device.type == "cpu" and cpu_graph.supports(model):
        graphs = cpu_graph.CPUGraphRunner(model, config.max_num_seqs)
    logit_sizes = buckets_up_to(config.max_num_seqs) if weight.device.type == "cuda" else None
    return ModelRunner(model, config.block_size, weight.device, graphs, tp, mixed, logit_sizes)


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        ckpt = load_checkpoint(config, self.device)
        self.tp, self._workers = None, []
        if config.tensor_parallel_size > 1:
            from perfxllm.engine import tensor_parallel

            tensor_parallel.check_divisible(ckpt.config, config.tensor_parallel_size)
            self.tp, self._workers = tensor_parallel.start(config, self.device)
            atexit.register(self.close)
        self.model_path, self.model_config, self.tokenizer = ckpt.path, ckpt.config, ckpt.tokenizer
        self.dtype = resolve_dtype(config.dtype, self.device, ckpt.config)
        self.max_model_len = ckpt.config.context_length(config.max_model_len)
        self.model = build_model(ckpt, self.device, self.dtype, self.tp, self.max_model_len)
        num_blocks = self._num_kv_blocks()
        if self.tp is not None:
            self.tp.broadcast(num_blocks)
        self.runner = make_runner(self.model, config, num_blocks, self.max_model_len, self.tp)
        if self.tp is None:  # a tensor-parallel group would have to run these on every rank together
            if runs_on_kernels(self.model.layers[0].input_layernorm.weight):
                self.runner.warm_up_steps(
                    config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len
                )
            self.runner.warm_up_logits()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler(self.device, config.seed)
        self.seqs: dict[str, Sequence] = {}
        self.detokenizers: dict[str, Detokenizer] = {}
        self._ids = itertools.count()
        self._in_flight: SampledBatch | None = None  # the last step's draws, not yet on the host
        self.async_scheduling = (
            self.device.type == "cuda" if config.async_scheduling is None else config.async_scheduling
        )

    def _num_kv_blocks(self) -> int:
        per_block = bytes_per_block(
            self.model.config, self.config.block_size, self.dtype
        )  # this rank's heads
        one_seq = -(-self.max_model_len // self.config.block_size)
        if self.config.kv_cache_memory_gb is not None:
            budget = self.config.kv_cache_memory_gb * 2**30
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = 0.9 * free - 2**30  # headroom for activations
        else:
            budget = max(2**30, one_seq * per_block)
        num_blocks = int(budget // per_block)
        if num_blocks < one_seq:
            raise PerfxError(
                f"the KV cache holds {num_blocks * self.config.block_size} tokens, less than max_model_len "
                f"{self.max_model_len}: lower --max-model-len or give the cache more memory"
            )
        return num_blocks

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do without them)."""
        if self.tp is not None:
            from perfxllm.engine import tensor_parallel

            tensor_parallel.stop(self.tp, self._workers)
            self.tp, self._workers = None, []

    # -- requests ---------------------------------------------------------------------------------------
    def add_request(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context holds {self.max_model_len}"
                " (prompt plus at least one generated token)"
            )
        if max(prompt_ids) >= self.model_config.vocab_size or min(prompt_ids) < 0:
            raise RequestError("the prompt has token ids outside the vocabulary")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        max_num_tokens = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        seq = Sequence(request_id, list(prompt_ids), params, max_num_tokens=max_num_tokens)
        self.seqs[request_id] = seq
        self.detokenizers[request_id] = Detokenizer(self.tokenizer, params.stop, prompt_ids)
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None:
            self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()  # a sequence whose last token is in flight is still running

    # -- the loop -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Launch a step, finish the previous one while the device runs this one, then queue this one's
        sampling. With async scheduling the host's work hides behind the device's (as vLLM's async
        scheduling and SGLang's overlap scheduler do): the outputs are the previous step's, and a sequence
        that stops on a drawn token has been given one more step, whose token is dropped. Without it, the
        step is finished before returning."""
        batch = self.scheduler.schedule()
        previous = self._in_flight
        if batch is not None:
            logits, sampling_seqs = self.runner.run(batch, previous)
        self._in_flight = None  # after the launch: a launch that fails leaves the draws for the next step
        outputs = self._postprocess(previous) if previous else []
        if batch is None:
            return outputs
        live = [i for i, seq in enumerate(sampling_seqs) if seq.status is not Status.FINISHED]
        if len(live) < len(sampling_seqs):  # stopped on the previous step's token, or aborted
            logits, sampling_seqs = logits[to_device(live, logits.device)], [sampling_seqs[i] for i in live]
        drawn = self.sampler(logits, sampling_seqs)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.status is not Status.FINISHED:
                seq.num_computed_tokens += n
                # every token the step ran is known here (the previous draw was just filled in): hash the
                # blocks it filled before a finish frees them or a preemption empties the table
                self.block_manager.register_full_blocks(seq)
        for seq in sampling_seqs:
            seq.token_ids.append(PENDING_TOKEN)
        if not self.async_scheduling:
            return outputs + self._postprocess(drawn)
        self._in_flight = drawn
        return outputs

    def _postprocess(self, drawn: SampledBatch) -> list[RequestOutput]:
        outputs = []
        for seq, sample in zip(drawn.seqs, drawn.samples()):
            if seq.status is Status.FINISHED:  # aborted while its token was drawn
                continue
            seq.token_ids[-1] = sample.token_id
            outputs.append(self._output_for(seq, sample))
        return outputs

    def _output_for(self, seq: Sequence, sample: Sample) -> RequestOutput:
        p, token = seq.params, sample.token_id
        detok = self.detokenizers[seq.request_id]
        reason = None
        if (not p.ignore_eos and token in self.tokenizer.eos_token_ids) or token in p.stop_token_ids:
            reason, text = "stop", detok.flush()
        else:
            text, hit_stop = detok.add(token)
            if hit_stop:
                reason = "stop"
            elif seq.num_tokens >= seq.max_num_tokens:
                reason = "length"
                text += detok.flush()
        out = RequestOutput(
            seq.request_id,
            text,
            [token],
            reason is not None,
            reason,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            seq.num_cached_tokens,
            [sample] if p.logprobs is not None else [],
        )
        if reason is not None:
            self._finish(seq, reason)
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.sampler.release(seq)
        self.seqs.pop(seq.request_id, None)
        self.detokenizers.pop(seq.request_id, None)
