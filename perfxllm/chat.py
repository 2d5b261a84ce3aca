"""PerfXChat: a streaming multi-turn chat in the terminal, on the in-process engine.

/reset forgets the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops the answer being written.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from perfxllm.cli import engine_options, sampling_params_from
from perfxllm.errors import PerfxError
from perfxllm.generate import stream_to
from perfxllm.llm import LLM

HELP = "Commands: /reset starts over, /exit quits. Ctrl-C stops an answer."


def run_chat(args: argparse.Namespace) -> int:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    params = sampling_params_from(args)
    print("Loading model...", file=sys.stderr)
    llm = LLM(args.model, **engine_options(args))
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print(f"PerfXChat on {llm.engine.model_path} ({llm.engine.device}). {HELP}")
    while True:
        try:
            line = input("\n>>> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(use /exit to quit)")
            continue
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(system)
            print("(conversation cleared)")
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}. {HELP}")
            continue
        messages.append({"role": "user", "content": line})
        answer = _Capture(sys.stdout)
        try:
            stats = stream_to(answer, llm.chat_stream(messages, params))
        except PerfxError as e:  # e.g. the conversation outgrew the context: say so and keep chatting
            messages.pop()
            print(f"error: {e}. /reset starts a new conversation.")
            continue
        messages.append({"role": "assistant", "content": answer.text})
        print(f"\n{stats.summary()}")


class _Capture:
    """Writes through to the terminal and keeps the answer for the history."""

    def __init__(self, out) -> None:
        self.out, self.text = out, ""

    def write(self, s: str) -> None:
        self.text += s
        self.out.write(s)

    def flush(self) -> None:
        self.out.flush()
