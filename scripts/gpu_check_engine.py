"""On a CUDA machine: the same greedy tokens on the GPU as on the CPU in fp32, and tokens/s on both.

    PYTHONPATH=. python scripts/gpu_check_engine.py [--gguf SLICE.gguf] --out results.json

Runs a random-weight model of the default model's shape (seeded, so both devices get the same weights) and,
with --gguf, a slice of the real model (scripts/slice_gguf.py makes one small enough to carry).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch

from perfxllm import LLM, SamplingParams
from perfxllm.bench import current_commit
from perfxllm.engine.model_runner import prompt_logits

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def run(model_kw: dict, device: str, dtype: str) -> dict:
    llm = LLM(device=device, dtype=dtype, max_model_len=1024, **model_kw)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    tokens = [c.token_ids for c in llm.generate(PROMPTS, params)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    n = len(
        llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=128, ignore_eos=True))[0].token_ids
    )
    sync()
    tok_s = n / (time.perf_counter() - start)
    logits = prompt_logits(llm.engine.model, llm.tokenizer.encode(PROMPTS[0] * 8)).cpu()
    return {"tokens": tokens, "decode_tok_s_batch1": tok_s, "logits": logits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    models = {"random-smollm2-135m": {"random_weights": "smollm2-135m"}}
    if args.gguf:
        models["smollm2-slice"] = {"model": args.gguf}
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "commit": current_commit(),
        "command": "python scripts/gpu_check_engine.py " + shlex.join(sys.argv[1:]),
        "models": {},
    }
    for name, kw in models.items():
        cpu = run(kw, "cpu", "float32")
        gpu = run(kw, "cuda", "float32")
        gpu16 = run(kw, "cuda", "float16")  # the fast path: Triton kernels, CUDA-graph decode
        eager16 = run({**kw, "enforce_eager": True}, "cuda", "float16")
        rel = float((gpu["logits"] - cpu["logits"]).norm() / cpu["logits"].norm())
        row = {
            "greedy_tokens_equal_fp32": cpu["tokens"] == gpu["tokens"],
            "logits_rel_err_fp32": rel,
            "cpu_fp32_tok_s": cpu["decode_tok_s_batch1"],
            "cuda_fp32_tok_s": gpu["decode_tok_s_batch1"],
            "cuda_fp16_tok_s": gpu16["decode_tok_s_batch1"],
            "cuda_fp16_eager_tok_s": eager16["decode_tok_s_batch1"],
            "fp16_graph_vs_eager_tokens_equal": gpu16["tokens"] == eager16["tokens"],
            "fp16_first_divergence_per_prompt": [
                next((i for i, (a, b) in enumerate(zip(c, g)) if a != b), len(c))
                for c, g in zip(cpu["tokens"], gpu16["tokens"])
            ],
            "fp16_first_divergence": next(
                (i for i, (a, b) in enumerate(zip(cpu["tokens"][0], gpu16["tokens"][0])) if a != b), None
            ),
            "cpu_tokens": cpu["tokens"],
            "cuda_tokens": gpu["tokens"],
        }
        report["models"][name] = row
        print(name, {k: v for k, v in row.items() if not k.endswith("tokens")}, flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
