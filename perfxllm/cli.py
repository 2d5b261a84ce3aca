"""The `perfxllm` command. Each subcommand's work lives in its own module; this file only parses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from perfxllm.errors import PerfxError


def add_engine_args(p: argparse.ArgumentParser, model_positional: bool = False) -> None:
    if model_positional:
        p.add_argument(
            "model",
            nargs="?",
            default=None,
            help="model folder or GGUF file (default: SmolLM2-135M-Instruct)",
        )
    else:
        p.add_argument(
            "--model", "-m", default=None, help="model folder or GGUF file (default: SmolLM2-135M-Instruct)"
        )
    p.add_argument(
        "--random-weights",
        default=None,
        metavar="PRESET|CONFIG",
        help="random weights of a real shape instead of a model file: llama2-7b, llama3-8b, "
        "qwen2-0.5b, smollm2-135m, or a config.json (for speed work)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's, at most 8192)"
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=256)
    g.add_argument("--temperature", "-t", type=float, default=0.8, help="0 for greedy (default: 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="0 disables (default: 40)")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params_from(args: argparse.Namespace):
    from perfxllm.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )


def engine_options(args: argparse.Namespace) -> dict:
    return dict(
        random_weights=args.random_weights,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from perfxllm.generate import run_generate

    return run_generate(args)


def cmd_chat(args: argparse.Namespace) -> int:
    from perfxllm.chat import run_chat

    return run_chat(args)


def cmd_info(args: argparse.Namespace) -> int:
    from perfxllm.info import run_info

    return run_info(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perfxllm", description="Fast LLM inference: chat, generate, serve."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("generate", "complete one prompt, streaming the text", cmd_generate),
        ("chat", "PerfXChat: a multi-turn chat in the terminal", cmd_chat),
        ("info", "describe a model: architecture, parameters, formats, memory", cmd_info),
    ]
    parsers = {}
    for name, help_text, fn in commands:
        parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        parsers[name].set_defaults(func=fn)

    p = parsers["generate"]
    p.add_argument("prompt")
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")

    p = parsers["chat"]
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")

    p = parsers["info"]
    add_engine_args(p, model_positional=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PerfxError as e:
        print(f"perfxllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
