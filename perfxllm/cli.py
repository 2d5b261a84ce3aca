"""The `perfxllm` command. Each subcommand's work lives in its own module; this file only parses."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable

from perfxllm.errors import PerfxError


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [low, high]; outside, argparse's one-line usage error (exit 2)."""

    def parse(text: str) -> int:
        value = int(text)  # a ValueError is argparse's "invalid int value"
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


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
    p.add_argument(
        "--quantization",
        default=None,
        choices=["int4", "int8"],
        help="quantize dense projections at load, round-to-nearest (int4: group 128); "
        "for AWQ use `perfxllm quantize`",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default: auto)")
    p.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's, at most 8192)"
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences batched per step (default: 64)")
    p.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="shard the model over this many GPUs (processes on the CPU) (default: 1)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="tokens per step; longer prompts are prefilled in chunks (default: 2048)",
    )
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make a step's outputs and the next step's inputs while the device runs; outputs come a step "
        "later (default: on with a GPU)",
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
        quantization=args.quantization,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        async_scheduling=args.async_scheduling,
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


def cmd_serve(args: argparse.Namespace) -> int:
    from perfxllm.server.serve import run_serve

    return run_serve(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "kernels":
        from perfxllm.bench.kernels import run as bench_kernels

        return bench_kernels(args, "perfxllm " + shlex.join(sys.argv[1:]))
    if args.bench == "e2e":
        args.command_line = "perfxllm " + shlex.join(sys.argv[1:])
        if args.device == "cuda":
            from perfxllm.bench.e2e_gpu import run_gpu

            run_gpu(args)
        else:
            from perfxllm.bench.e2e_cpu import run_cpu

            run_cpu(args)
        return 0
    from perfxllm.bench.serve import run_bench_serve

    return run_bench_serve(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    from perfxllm.quantize import run_quantize

    return run_quantize(args)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from perfxllm.model.gguf_writer import write_gguf
    from perfxllm.model.loader import open_checkpoint

    ckpt = open_checkpoint(args.model, args.random_weights, dequantize=True)
    try:
        write_gguf(ckpt, args.output, args.type)
    except OSError as e:
        raise PerfxError(f"cannot write {args.output}: {e.strerror or e}") from None
    print(f"wrote {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from perfxllm.eval.ppl import run_eval_ppl

    return run_eval_ppl(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perfxllm", description="Fast LLM inference: chat, generate, serve."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("generate", "complete one prompt, streaming the text", cmd_generate),
        ("chat", "PerfXChat: a multi-turn chat in the terminal", cmd_chat),
        ("info", "describe a model: architecture, parameters, formats, memory", cmd_info),
        ("quantize", "quantize a model to int4 or int8 (AWQ or round-to-nearest)", cmd_quantize),
        ("eval", "evaluate a model's quality (perplexity)", cmd_eval),
        ("serve", "an OpenAI-compatible HTTP server", cmd_serve),
        ("bench", "benchmarks", cmd_bench),
        (
            "export-gguf",
            "write a model as GGUF for llama.cpp (e.g. a random model of a real shape)",
            cmd_export_gguf,
        ),
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
    p.add_argument(
        "--estimate",
        default=None,
        metavar="CONFIG",
        help="weight memory as fp16, int8 and int4 g128 without loading weights: a config.json, a model "
        "folder, or llama2-7b, llama3-8b, qwen2-0.5b, smollm2-135m",
    )

    p = parsers["quantize"]
    p.add_argument(
        "src",
        nargs="?",
        default=None,
        help="dense model: a Hugging Face folder, or a GGUF file, dequantized first (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--output", "-o", required=True, help="folder to write the quantized model to")
    p.add_argument(
        "--method", choices=["awq", "rtn"], default="awq", help="AWQ or round-to-nearest (default: awq)"
    )
    p.add_argument(
        "--bits", type=int, choices=[4, 8], default=4, help="4: int4 per group; 8: int8 per channel"
    )
    p.add_argument(
        "--group-size", type=int, default=128, help="int4 group size: 128, 64 or 32 (default: 128)"
    )
    p.add_argument("--calib", default=None, help="calibration text file (default: Python's pydoc topics)")
    p.add_argument("--n-samples", type=int_in(1), default=128, help="calibration samples (default: 128)")
    p.add_argument(
        "--seq-len", type=int_in(2), default=512, help="tokens per calibration sample (default: 512)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", default="auto", help="compute dtype (default: float32 on CPU, float16 on GPU)")
    p.add_argument(
        "--quantize-lm-head", action="store_true", help="also quantize an untied lm_head (default: dense)"
    )
    p.add_argument("--no-clip", action="store_true", help="AWQ without the clipping search")
    p.add_argument(
        "--scale-grid",
        choices=["plain", "duo", "both"],
        default="plain",
        help="AWQ scale candidates: mean|x|^a (plain, the default), AutoAWQ's mean|x|^a / mean|w|^(1-a) "
        "(duo), or both",
    )

    p = (
        parsers["eval"]
        .add_subparsers(dest="eval", required=True)
        .add_parser(
            "ppl",
            help="perplexity over windows of a text",
            description="Perplexity over non-overlapping windows of --ctx tokens, each scored on its own.",
        )
    )
    add_engine_args(p, model_positional=True)
    p.add_argument(
        "--text", default=None, help="text file (default: the held-out 20%% of Python's pydoc topics)"
    )
    p.add_argument("--ctx", type=int_in(2), default=512, help="tokens per window (default: 512)")
    p.add_argument(
        "--max-windows", type=int_in(1), default=None, help="score at most N windows (default: all)"
    )
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="GGUF: dense weights (default: Q4_0/Q4_1/Q8_0 packed, as the engine runs them)",
    )
    p.add_argument("--record", default=None, metavar="JSON", help="add the result to this JSON results file")
    p.add_argument("--name", default=None, help="the result's key in --record (default: the model's name)")

    p = parsers["serve"]
    add_engine_args(p, model_positional=True)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int_in(0, 65535), default=8000)
    p.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $PERFXLLM_API_KEY)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=512,
        help="requests waiting or running before answering 429 (default: 512)",
    )
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body, MiB (default: 4)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    p = parsers["export-gguf"]
    p.add_argument("model", nargs="?", default=None, help="model folder or GGUF file (or --random-weights)")
    p.add_argument("--random-weights", default=None, metavar="PRESET|CONFIG", help="a seeded random model")
    p.add_argument("--output", "-o", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="q4_0", choices=["q4_0", "q4_1", "q8_0", "f16", "f32"])

    bench = parsers["bench"].add_subparsers(dest="bench", required=True)
    from perfxllm.bench.kernels import add_arguments as add_kernel_arguments

    add_kernel_arguments(
        bench.add_parser("kernels", help="Triton kernels against cuBLAS and the copy bandwidth (GPU)")
    )
    p = bench.add_parser(
        "e2e",
        help="prefill and decode token/s through the whole engine (CPU: against llama.cpp on the same GGUF)",
        description="CPU: pp128/pp512/tg128 of perfxllm and llama.cpp (llama-cpp-python, the bench extra) on "
        "the same GGUF. GPU: random-weight models of real shapes against the bandwidth roofline.",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int_in(1), default=5)
    p.add_argument("--out-dir", default="benchmarks/results", help="where e2e-<device>.json and .png go")
    cpu = p.add_argument_group("--device cpu")
    cpu.add_argument(
        "model", nargs="?", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1)"
    )
    cpu.add_argument(
        "--threads", type=int_in(1), default=None, help="threads for both engines (default: the cores)"
    )
    cpu.add_argument("--no-llama-cpp", action="store_true", help="only perfxllm")
    gpu = p.add_argument_group("--device cuda")
    gpu.add_argument("--random-weights", default="llama2-7b", help="model shape (default: llama2-7b)")
    gpu.add_argument("--quant", nargs="+", default=["int4", "fp16"], choices=["int4", "int8", "fp16"])
    gpu.add_argument("--prompt-len", type=int_in(1), default=512)
    gpu.add_argument("--gen-len", type=int_in(1), default=128)
    gpu.add_argument(
        "--batch", type=int_in(1), nargs="+", default=[1], help="batch sizes to decode at (default 1)"
    )
    gpu.add_argument("--sweep", action="store_true", help="also decode at batch 1, 2, 4 .. 64")
    gpu.add_argument("--hf", action="store_true", help="also time Hugging Face transformers fp16 generate")
    p = bench.add_parser(
        "serve",
        help="serving throughput and latency",
        description="Serving throughput and latency, as vllm bench serve.",
    )
    add_engine_args(p, model_positional=True)
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--base-url", default=None, help="a running server (default: start one on a free port)"
    )
    where.add_argument(
        "--offline", action="store_true", help="run on the Engine in-process, all requests at once"
    )
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[8],
        help="requests in flight; several values: one run each",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second (default: all at once)",
    )
    p.add_argument(
        "--input-len", type=int, default=200, help="median prompt tokens (lognormal; default: 200)"
    )
    p.add_argument(
        "--output-len", type=int, default=150, help="median output tokens (lognormal; default: 150)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", default="benchmarks/results", help="where serve-<device>.json and .png go")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except PerfxError as e:
        print(f"perfxllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
