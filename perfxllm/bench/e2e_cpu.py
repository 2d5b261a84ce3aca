"""`perfxllm bench e2e --device cpu [MODEL]`: llama-bench's pp128 / pp512 / tg128 for perfxllm and for
llama.cpp (through llama-cpp-python, the `bench` extra) on the identical GGUF file, in the same run, the two
engines alternating repeat by repeat (this machine's speed drifts by 10-30% between runs); medians.

    ppN    a prompt of N tokens (from the held-out pydoc text) to its first token, from an empty cache
    tg128  128 tokens decoded one at a time after a one-token prompt, the prompt's step not counted

Our numbers are engine steps as a user gets them (scheduling, sampling and detokenizing included); llama.cpp's
are its `eval` calls (no sampling), as llama-bench times them. Also `perfxllm chat`'s experience: time to
first token and token/s of a chat answer. Writes benchmarks/results/e2e-cpu.json and e2e-cpu.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from perfxllm.bench import current_commit
from perfxllm.errors import PerfxError
from perfxllm.llm import LLM
from perfxllm.model.loader import default_model_path
from perfxllm.quant.calibration import default_eval_text
from perfxllm.sampling_params import SamplingParams

PROMPT_LENS = (128, 512)
GEN_LEN = 128
CHAT_QUESTION = "What is the capital of France? Answer in two sentences."


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Ours:
    name = "perfxllm"

    def __init__(self, model: str, max_len: int) -> None:
        self.llm = LLM(
            model, device="cpu", max_model_len=max_len, enable_prefix_caching=False, max_num_seqs=1
        )
        self.engine = self.llm.engine

    def prefill(self, ids: list[int]) -> float:
        self.engine.add_request(ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        while self.engine.has_unfinished():
            self.engine.step()
        return len(ids) / (time.perf_counter() - start)

    def decode(self, first: int, n: int) -> float:
        self.engine.add_request([first], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        self.engine.step()  # the one-token prompt
        start = time.perf_counter()
        while self.engine.has_unfinished():
            self.engine.step()
        return (n - 1) / (time.perf_counter() - start)


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, model: str, max_len: int, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=model, n_ctx=max_len, n_batch=512, n_threads=threads, verbose=False)

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - start)

    def decode(self, first: int, n: int) -> float:
        self.llm.reset()
        self.llm.eval([first])
        token = first
        start = time.perf_counter()
        for _ in range(n - 1):
            token = int(self.llm.scores[self.llm.n_tokens - 1].argmax())  # greedy, as ours
            self.llm.eval([token])
        return (n - 1) / (time.perf_counter() - start)


def measure(engine: Ours | LlamaCpp, ids: list[int]) -> dict[str, Callable[[], float]]:
    runs: dict[str, Callable[[], float]] = {
        f"pp{n}": (lambda n=n: engine.prefill(ids[:n])) for n in PROMPT_LENS
    }
    runs[f"tg{GEN_LEN}"] = lambda: engine.decode(ids[0], GEN_LEN)
    return runs


def chat_experience(ours: Ours, repeats: int) -> dict:
    """`perfxllm chat`'s first answer: time to first token and decode token/s, medians."""
    messages = [{"role": "user", "content": CHAT_QUESTION}]
    ttft, rates = [], []
    for _ in range(repeats):
        start, first, tokens = time.perf_counter(), None, 0
        for out in ours.llm.chat_stream(messages, SamplingParams(temperature=0, max_tokens=96)):
            tokens += len(out.token_ids)
            if first is None and out.token_ids:
                first = time.perf_counter()
        end = time.perf_counter()
        ttft.append(first - start)
        rates.append((tokens - 1) / (end - first))
    return {
        "question": CHAT_QUESTION,
        "prompt_tokens": len(ours.llm.tokenizer.encode_chat(messages)),
        "answer_tokens": tokens,
        "ttft_ms": round(statistics.median(ttft) * 1e3, 1),
        "tok_s": round(statistics.median(rates), 1),
    }


def run_cpu(args: argparse.Namespace) -> dict:
    model = args.model or default_model_path()
    args.threads = args.threads or torch.get_num_threads()  # torch's default: the physical cores
    torch.set_num_threads(args.threads)
    max_len = max(PROMPT_LENS) + GEN_LEN + 16
    ours = Ours(model, max_len)
    ids = ours.llm.tokenizer.encode(default_eval_text())[: max(PROMPT_LENS)]  # the same tokens for both
    engines: list[Ours | LlamaCpp] = [ours]
    if not args.no_llama_cpp:
        try:
            engines.append(LlamaCpp(model, max_len, args.threads))
        except ImportError:
            raise PerfxError(
                "llama-cpp-python is not installed: pip install -e '.[bench]' (it builds llama.cpp), "
                "or pass --no-llama-cpp"
            ) from None
    plans = {e.name: measure(e, ids) for e in engines}
    for e in engines:  # warm-up: kernel builds, first-touch of the weights
        plans[e.name][f"pp{PROMPT_LENS[0]}"]()
        e.decode(ids[0], 8)
    results: dict[str, dict[str, list[float]]] = {e.name: {k: [] for k in plans[e.name]} for e in engines}
    for rep in range(args.repeats):
        for e in engines if rep % 2 == 0 else reversed(engines):  # alternate which goes first
            for test, fn in plans[e.name].items():
                results[e.name][test].append(fn())
        print(f"repeat {rep + 1}/{args.repeats}", flush=True)
    quant = "Q4_1" if "q4_1" in Path(model).name.lower() else Path(model).suffix.lstrip(".")
    rows = []
    for e in engines:
        med = {test: round(statistics.median(v), 1) for test, v in results[e.name].items()}
        rows.append(
            {
                "engine": e.name,
                "model": Path(model).name,
                "quant": quant,
                "threads": args.threads,
                **{f"{test}_tok_s": v for test, v in med.items()},
                "runs": {test: [round(x, 1) for x in v] for test, v in results[e.name].items()},
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "runs"}), flush=True)
    record = {
        "cpu": cpu_name(),
        "cores": torch.get_num_threads(),
        "commit": current_commit(),
        "torch": torch.__version__,
        "command": args.command_line,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "repeats": args.repeats,
        "rows": rows,
    }
    if len(rows) == 2:
        import llama_cpp

        record["llama_cpp_python"] = llama_cpp.__version__
        record["ratio_vs_llama_cpp"] = {
            test: round(rows[0][test] / rows[1][test], 2) for test in rows[0] if test.endswith("_tok_s")
        }
        print("perfxllm / llama.cpp:", json.dumps(record["ratio_vs_llama_cpp"]), flush=True)
    record["chat"] = chat_experience(ours, args.repeats)
    print("chat:", json.dumps(record["chat"]), flush=True)
    out = Path(args.out_dir) / "e2e-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out}", flush=True)
    return record


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = [k for k in record["rows"][0] if k.endswith("_tok_s")]
    fig, axes = plt.subplots(1, len(tests), figsize=(3 * len(tests), 3.6))
    for ax, test in zip(axes, tests):
        names = [r["engine"] for r in record["rows"]]
        values = [r[test] for r in record["rows"]]
        bars = ax.bar(names, values, color=["tab:blue", "tab:gray"][: len(names)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(test.removesuffix("_tok_s"))
        ax.set_ylabel("token/s")
    row = record["rows"][0]
    fig.suptitle(f"{row['model']} on {record['cpu']}, {row['threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
