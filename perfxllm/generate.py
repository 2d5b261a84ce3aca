"""`perfxllm generate`: one prompt, text streamed to stdout, speed to stderr."""

from __future__ import annotations

import argparse
import sys
import time

from perfxllm.cli import engine_options, sampling_params_from
from perfxllm.llm import LLM


def run_generate(args: argparse.Namespace) -> int:
    params = sampling_params_from(args)
    llm = LLM(args.model, **engine_options(args))
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt_ids = llm.tokenizer.encode_chat(messages)
    else:
        prompt_ids = llm.tokenizer.encode(args.prompt)
    stats = stream_to(sys.stdout, llm.stream_ids(prompt_ids, params))
    print(file=sys.stdout)
    print(stats.summary(), file=sys.stderr)
    return 0


class StreamStats:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0
        self.finish_reason: str | None = None

    def summary(self) -> str:
        end = time.perf_counter()
        ttft = (self.first or end) - self.start
        rate = (
            (self.tokens - 1) / (end - self.first)
            if self.first and self.tokens > 1 and end > self.first
            else 0.0
        )
        return f"[{self.tokens} tokens, first after {ttft * 1000:.0f} ms, {rate:.1f} tokens/s, {self.finish_reason}]"


def stream_to(out, outputs) -> StreamStats:
    """Write each output's text as it arrives; returns timing stats. Ctrl-C ends the stream early."""
    stats = StreamStats()
    try:
        for o in outputs:
            stats.first = stats.first or time.perf_counter()
            stats.tokens += len(o.token_ids)
            stats.finish_reason = o.finish_reason
            out.write(o.text)
            out.flush()
    except KeyboardInterrupt:
        stats.finish_reason = "interrupted"
        outputs.close()
    return stats
