"""`perfxllm bench e2e --device cuda`: llama-bench's pp512 / tg128 through the whole engine on the GPU, for
random-weight models of real shapes (int4 g128 and fp16), batch 1 and a decode sweep up to batch 64, next
to the bandwidth roofline measured in the same run and Hugging Face transformers' fp16 `generate`.

Decode token/s is timed over the steps after every request has its first token (pure decode steps);
prefill token/s over the steps before. The roofline at batch B is B * copy bandwidth / bytes read per step
(every projection weight and lm_head once, plus each sequence's KV cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from perfxllm.bench import copy_gbps, current_commit
from perfxllm.engine.config import EngineConfig
from perfxllm.engine.engine import Engine, device_tag
from perfxllm.layers.linear import Linear
from perfxllm.model.config import ModelConfig
from perfxllm.model.random_weights import PRESETS
from perfxllm.sampling_params import SamplingParams

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def weight_bytes_per_token(engine: Engine) -> int:
    """Bytes of the weights a decode step reads: every projection and the logits' matrix."""
    from perfxllm.quant.formats import tensor_fields

    def nbytes(w) -> int:
        if isinstance(w, torch.Tensor):
            return w.numel() * w.element_size()
        return sum(getattr(w, f).numel() * getattr(w, f).element_size() for f in tensor_fields(w))

    model = engine.model
    total = sum(nbytes(m.weight) for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head)
    head = model.embed_tokens.weight if model.config.tie_word_embeddings else model.lm_head.weight
    return total + nbytes(head)


def kv_bytes_per_token(engine: Engine) -> int:
    cfg = engine.model_config
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * engine.dtype.itemsize


def timed_generation(engine: Engine, batch: int, prompt_len: int, gen_len: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = min(engine.model_config.vocab_size, 32000)
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(3, vocab, (prompt_len,), generator=g).tolist(), params)
    started: set[str] = set()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    t_first = None
    while engine.has_unfinished():
        for out in engine.step():
            started.add(out.request_id)
        if t_first is None and len(started) == batch:  # every first token is on the host
            t_first = time.perf_counter()
    torch.cuda.synchronize()
    t_end = time.perf_counter()
    return {
        "prefill_tok_s": batch * prompt_len / (t_first - t0),
        "decode_tok_s": batch * (gen_len - 1) / (t_end - t_first),
        "ms_per_step": 1e3 * (t_end - t_first) / (gen_len - 1),
    }


def bench_engine(
    preset: str, quant: str | None, batches: tuple[int, ...], args: argparse.Namespace, copy: float
) -> list[dict]:
    max_len = args.prompt_len + args.gen_len + 16
    cfg = ModelConfig.from_hf(PRESETS[preset])
    kv_gb = max(batches) * (max_len + 16) * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 / 2**30
    engine = Engine(
        EngineConfig(
            random_weights=preset,
            quantization=quant,
            device="cuda",
            dtype="float16",
            max_model_len=max_len,
            max_num_seqs=max(batches),
            max_num_batched_tokens=max(2048, args.prompt_len),
            kv_cache_memory_gb=kv_gb,
            enable_prefix_caching=False,
        )
    )
    wbytes, kvbytes = weight_bytes_per_token(engine), kv_bytes_per_token(engine)
    timed_generation(engine, 1, args.prompt_len, 8, seed=99)  # warm-up
    rows = []
    for b in batches:
        torch.cuda.reset_peak_memory_stats()
        runs = [
            timed_generation(engine, b, args.prompt_len, args.gen_len, seed=i) for i in range(args.repeats)
        ]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        step_bytes = wbytes + b * kvbytes * (args.prompt_len + args.gen_len / 2)
        roofline = b * copy * 1e9 / step_bytes
        rows.append(
            {
                "engine": "perfxllm",
                "model": preset,
                "quant": quant or "fp16",
                "batch": b,
                "prompt_len": args.prompt_len,
                "gen_len": args.gen_len,
                "prefill_tok_s": round(med["prefill_tok_s"], 1),
                "decode_tok_s": round(med["decode_tok_s"], 1),
                "ms_per_token": round(med["ms_per_step"], 3),
                "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                "weight_gb": round(wbytes / 1e9, 3),
                "roofline_tok_s": round(roofline, 1),
                "roofline_frac": round(med["decode_tok_s"] / roofline, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    rows[0]["step_breakdown"] = step_breakdown(engine, rows[0]["batch"], args.prompt_len)
    del engine
    torch.cuda.empty_cache()
    return rows


def kernel_times(run: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """GPU time of every kernel that run() launches (torch.profiler): (total ms, the top 12 by name)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:80]] = kernels.get(e.name[:80], 0.0) + e.device_time_total / 1e3
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return round(sum(kernels.values()), 3), {k: round(v, 4) for k, v in top}


def step_breakdown(engine: Engine, batch: int, prompt_len: int) -> dict:
    """Where the time goes: one prompt's prefill step (wall time, then its kernels' GPU time from a second,
    profiled prefill), and with `batch` sequences decoding, the whole engine step, the graph replay alone
    and the top kernels of one eager step."""
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    engine.add_request(list(range(3, 3 + prompt_len)), params)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.step()  # prefill
    torch.cuda.synchronize()
    prefill_ms = (time.perf_counter() - t0) * 1e3
    while engine.has_unfinished():
        engine.step()
    for i in range(batch):
        engine.add_request(list(range(3 + i, 3 + i + prompt_len)), params)
    started: set[str] = set()
    while len(started) < batch:  # the prompts' steps
        started.update(out.request_id for out in engine.step())
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 20 * 1e3
    graphs = engine.runner.graphs
    replay_ms = None
    if graphs is not None:
        graph = graphs.graphs[graphs.bucket(batch)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        end.synchronize()
        replay_ms = start.elapsed_time(end) / 20
    runner = engine.runner
    graphs, mixed, runner.graphs, runner.mixed_graphs = runner.graphs, runner.mixed_graphs, None, None
    decode_total, decode_top = kernel_times(engine.step)  # one eager decode step
    runner.graphs, runner.mixed_graphs = graphs, mixed
    while engine.has_unfinished():
        engine.step()
    engine.add_request(list(range(4, 4 + prompt_len)), params)
    prefill_total, prefill_top = kernel_times(engine.step)
    while engine.has_unfinished():
        engine.step()
    return {
        "prefill_step_ms": round(prefill_ms, 3),
        "prefill_kernel_total_ms": prefill_total,
        "prefill_kernels_ms": prefill_top,
        "decode_batch": batch,
        "engine_step_ms": round(step_ms, 3),
        "graph_replay_ms": None if replay_ms is None else round(replay_ms, 3),
        "eager_step_kernels_ms": decode_top,
        "eager_step_kernel_total_ms": decode_total,
    }


def hf_baseline(preset: str, prompt_len: int, gen_len: int) -> dict:
    """transformers' fp16 `generate` (dynamic cache, eager) on a random model of the same shape."""
    import transformers

    cfg = transformers.AutoConfig.for_model(
        "llama", **{k: v for k, v in PRESETS[preset].items() if k != "architectures"}
    )
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float16).eval()
    ids = torch.randint(3, 32000, (1, prompt_len), device="cuda")

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    gen(4)
    t1 = statistics.median(gen(1) for _ in range(3))
    tn = statistics.median(gen(gen_len) for _ in range(3))
    row = {
        "engine": "transformers",
        "model": preset,
        "quant": "fp16",
        "batch": 1,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "prefill_tok_s": round(prompt_len / t1, 1),
        "decode_tok_s": round((gen_len - 1) / (tn - t1), 1),
        "transformers": transformers.__version__,
    }
    print(json.dumps(row), flush=True)
    return row


def engine_batches(batch: list[int], sweep: bool) -> list[tuple[int, ...]]:
    """The batch sizes to decode at, one tuple per engine: batch 1 gets an engine of its own, sized for one
    sequence; the others share one."""
    sizes = set(batch) | (set(BATCHES) if sweep else set())
    return [b for b in ((1,) if 1 in sizes else (), tuple(sorted(sizes - {1}))) if b]


def run_gpu(args: argparse.Namespace) -> dict:
    import triton

    from perfxllm.kernels.pdl import pdl_enabled

    device = torch.device("cuda")
    copy = copy_gbps(device)
    print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
    rows: list[dict] = []
    for quant in args.quant:
        q = None if quant == "fp16" else quant
        for batches in engine_batches(args.batch, args.sweep):
            rows += bench_engine(args.random_weights, q, batches, args, copy)
    if args.hf:
        rows.append(hf_baseline(args.random_weights, args.prompt_len, args.gen_len))
    name = torch.cuda.get_device_name(device)
    record = {
        "device": name,
        "commit": current_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_gbps": round(copy, 1),
        "pdl": pdl_enabled(device),
        "command": args.command_line,
        "rows": rows,
    }
    out = Path(args.out_dir) / f"e2e-{device_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out}", flush=True)
    return record


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ours = [r for r in record["rows"] if r["engine"] == "perfxllm"]
    for quant in dict.fromkeys(r["quant"] for r in ours):
        rows = sorted((r for r in ours if r["quant"] == quant), key=lambda r: r["batch"])
        b = [r["batch"] for r in rows]
        (line,) = ax.plot(b, [r["decode_tok_s"] for r in rows], "o-", label=f"perfxllm {quant}")
        ax.plot(
            b, [r["roofline_tok_s"] for r in rows], "--", color=line.get_color(), label=f"roofline {quant}"
        )
    for r in record["rows"]:
        if r["engine"] != "perfxllm":
            ax.plot([r["batch"]], [r["decode_tok_s"]], "s", label=f"{r['engine']} {r['quant']}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (sequences decoding together)")
    ax.set_ylabel("decode token/s")
    model = ours[0]["model"] if ours else ""
    ax.set_title(f"{model} decode on {record['device']} (copy {record['copy_gbps']:.0f} GB/s)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
