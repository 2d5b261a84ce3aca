"""The engine's host (Python) time per decode step at a serving batch, without a model.

    .venv/bin/python scripts/profile_host_step.py [--num-seqs 256] [--prompt-len 200] [--output-len 150]
        [--vocab 128256] [--sampling greedy|sampled|penalties|logprobs] [--device cpu|cuda]
        [--tokenizer tokenizer.json]

Runs the real `Engine.step()` (Scheduler, BlockManager, ModelRunner.prepare, Sampler, Detokenizer and the
engine's postprocessing) for N random prompts added at once, as `perfxllm bench serve --offline` does
(ignore_eos: every request generates exactly --output-len tokens), with the default model's tokenizer
(SmolLM2) unless --tokenizer names a tokenizer.json. The model is a stub: `ModelRunner.execute` returns
random float32 logits [S, vocab] whose argmax is a random token of the tokenizer's vocabulary. A real step
adds the model's GPU time and the host-side work of feeding it (CUDAGraphRunner.run: the step's inputs
turned into tensors and copied to the device) to what is printed here.

Prints the median milliseconds per decode step (every sequence decoding one token) of each phase, and a
digest of all outputs (text, tokens, finish reasons, logprobs) to check that a change leaves them alone.
`sample` includes the tensor work on the logits, which a real step does on the GPU: on the CPU, the argmax
over [256, 128256] alone takes tens of milliseconds. That argmax is timed again on its own right after the
sampler, and the last line is the total without it: the host's own time (for greedy sampling; the other
modes do more tensor work on the logits). With --device cuda, the logits and sampling are on the GPU, as in
a real step, and `sample` includes waiting for it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import tokenizers
import torch

from perfxllm.engine.block_manager import BlockManager
from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine, RequestOutput
from perfxllm.engine.model_runner import ModelRunner, StepInputs
from perfxllm.engine.sampler import SampledBatch, Sampler
from perfxllm.engine.scheduler import ScheduledBatch, Scheduler
from perfxllm.engine.sequence import Sequence
from perfxllm.model.loader import open_checkpoint
from perfxllm.model.tokenizer import Tokenizer
from perfxllm.sampling_params import SamplingParams

SAMPLING = {
    "greedy": dict(temperature=0.0),
    "sampled": dict(temperature=0.8, top_k=50, top_p=0.95),
    "penalties": dict(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5),
    "logprobs": dict(temperature=0.0, logprobs=5),
}
PHASES = ("schedule", "prepare", "sample", "postprocess")


class Timer:
    """Seconds per phase of the current step."""

    def __init__(self) -> None:
        self.step: dict[str, float] = defaultdict(float)
        self.decoding = 0  # sequences in the step's batch if every one of them decodes a token, else 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.step[name] += time.perf_counter() - start


class TimedScheduler(Scheduler):
    timer: Timer

    def schedule(self) -> ScheduledBatch | None:
        with self.timer.phase("schedule"):
            batch = super().schedule()
        self.timer.decoding = len(batch.seqs) if batch and batch.num_tokens == len(batch.seqs) else 0
        return batch


class TimedSampler(Sampler):
    timer: Timer

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampledBatch:
        with self.timer.phase("sample"):
            samples = super().__call__(logits, seqs)
        with self.timer.phase("argmax"):  # the same argmax again, alone, for the tensor work it stands for
            logits.argmax(dim=-1).tolist()
        return samples


class StubRunner(ModelRunner):
    """The real ModelRunner.prepare; execute returns random logits instead of running a model."""

    def __init__(self, block_size: int, vocab: int, tokens: int, max_seqs: int, timer: Timer, device: str):
        super().__init__(None, block_size, torch.device(device))
        self.timer, self.tokens = timer, tokens
        self.gen = torch.Generator(device).manual_seed(0)
        self.base = torch.rand(max_seqs, vocab, generator=self.gen, device=device)
        self.base[:, tokens:] = float("-inf")  # ids the tokenizer does not have are never drawn

    def prepare(
        self, batch: ScheduledBatch, drawn: SampledBatch | None = None
    ) -> tuple[StepInputs, list[Sequence]]:
        with self.timer.phase("prepare"):
            return super().prepare(batch, drawn)

    def execute(self, inputs: StepInputs, drawn_tokens: torch.Tensor | None = None) -> torch.Tensor:
        rows = len(inputs.logit_rows)
        logits = self.base[:rows].clone()
        winners = torch.randint(self.tokens, (rows,), generator=self.gen, device=self.device)
        logits[torch.arange(rows, device=self.device), winners] = 2.0  # greedy's choice; sampling's is random
        return logits


class ProfiledEngine(Engine):
    """The real Engine loop over the real scheduling, sampling and detokenization state; no model."""

    def __init__(self, tokenizer: Tokenizer, args: argparse.Namespace) -> None:
        self.timer = Timer()
        max_len = args.prompt_len + args.output_len
        self.config = EngineConfig(max_num_seqs=args.num_seqs, max_model_len=max_len, device=args.device)
        self.device, self.tokenizer, self.max_model_len = torch.device(args.device), tokenizer, max_len
        self.model_config = SimpleNamespace(vocab_size=args.vocab)
        bs = self.config.block_size
        num_blocks = args.num_seqs * -(-max_len // bs)
        self.block_manager = BlockManager(num_blocks, bs, self.config.enable_prefix_caching)
        self.scheduler = TimedScheduler(
            self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens
        )
        self.sampler = TimedSampler(self.device, self.config.seed)
        self.scheduler.timer = self.sampler.timer = self.timer
        tokens = min(tokenizer.vocab_size, args.vocab)
        self.runner = StubRunner(bs, args.vocab, tokens, args.num_seqs, self.timer, args.device)
        self.seqs, self.detokenizers, self._ids = {}, {}, itertools.count()
        self._in_flight, self.async_scheduling = None, False

    def _postprocess(self, drawn: SampledBatch) -> list[RequestOutput]:
        with self.timer.phase("postprocess"):  # waits for the draws' copy to the host
            return super()._postprocess(drawn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=150)
    ap.add_argument("--vocab", type=int, default=128256, help="the logits' width (Llama 3's vocabulary)")
    ap.add_argument("--sampling", choices=SAMPLING, default="greedy")
    ap.add_argument("--device", default="cpu", help="where the logits are and sampling runs")
    ap.add_argument("--tokenizer", help="a tokenizer.json (default: the default model's tokenizer)")
    args = ap.parse_args()

    if args.tokenizer:
        tokenizer = Tokenizer(tokenizers.Tokenizer.from_file(args.tokenizer), {})
    else:
        tokenizer = open_checkpoint(None).tokenizer
    engine = ProfiledEngine(tokenizer, args)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, **SAMPLING[args.sampling])
    gen, tokens = torch.Generator().manual_seed(1), min(tokenizer.vocab_size, args.vocab)
    for _ in range(args.num_seqs):
        engine.add_request(torch.randint(tokens, (args.prompt_len,), generator=gen).tolist(), params)

    steps: list[dict[str, float]] = []
    digest = hashlib.sha256()
    while engine.has_unfinished():
        engine.timer.step.clear()
        for out in engine.step():
            digest.update(
                repr((out.request_id, out.text, out.token_ids, out.finish_reason, out.logprobs)).encode()
            )
        if engine.timer.decoding == args.num_seqs:
            step = engine.timer.step
            total = sum(step[p] for p in PHASES)
            steps.append({**step, "total": total, "host": total - step["argmax"]})

    rows = [*PHASES, "total", "argmax", "host"]
    ms = {k: 1e3 * statistics.median(s[k] for s in steps) for k in rows}
    names = {"argmax": "  argmax alone (in sample)", "host": "total less the argmax"}
    print(
        f"{len(steps)} decode steps of {args.num_seqs} sequences, {args.sampling}, vocab {args.vocab}, {args.device}"
    )
    print("median ms per step")
    for k in rows:
        print(f"{names.get(k, k):<28}{ms[k]:7.2f}")
    print(f"outputs sha256 {digest.hexdigest()[:16]}")


if __name__ == "__main__":
    main()
