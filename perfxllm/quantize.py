"""`perfxllm quantize SRC -o DST`: load a dense model (a Hugging Face folder, or a GGUF file dequantized),
quantize its projections with RTN or AWQ, and write a folder that perfxllm loads directly."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from perfxllm.errors import PerfxError


def run_quantize(args: argparse.Namespace) -> int:
    from perfxllm.engine.engine import resolve_device
    from perfxllm.model.loader import build_model, open_checkpoint, resolve_dtype
    from perfxllm.quant.awq import AWQConfig
    from perfxllm.quant.calibration import calibration_samples, default_calibration_text, read_text
    from perfxllm.quant.formats import INT4_GROUP_SIZES
    from perfxllm.quant.load import QuantizedFolder
    from perfxllm.quant.pipeline import quantize_model
    from perfxllm.quant.rtn import QuantSpec
    from perfxllm.quant.save import save_quantized

    if args.bits == 4 and args.group_size not in INT4_GROUP_SIZES:
        raise PerfxError(f"--group-size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PerfxError(f"{out} exists and is not an empty folder")
    device = resolve_device(args.device)
    ckpt = open_checkpoint(args.src, dequantize=True)
    if isinstance(ckpt.source, QuantizedFolder):
        raise PerfxError(f"{ckpt.path} is already quantized: give a dense model (or a GGUF file)")
    if args.seq_len > ckpt.config.max_position_embeddings:
        raise PerfxError(f"--seq-len {args.seq_len} is longer than the model's context")
    spec = QuantSpec(args.bits, args.group_size)
    cfg = ckpt.config
    spec.check_fits(cfg, ckpt.path)
    try:  # before the minutes of quantizing, not after
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PerfxError(f"cannot make {out}: {e.strerror or e}") from None
    model = build_model(ckpt, device, resolve_dtype(args.dtype, device, cfg), max_positions=args.seq_len)
    samples = None
    if args.method == "awq":
        text = read_text(args.calib, default_calibration_text())
        samples = calibration_samples(ckpt.tokenizer, text, args.n_samples, args.seq_len)
    grids = ("plain", "duo") if args.scale_grid == "both" else (args.scale_grid,)
    awq = AWQConfig(scale_grids=grids, clip=not args.no_clip)
    start = time.perf_counter()
    stats = quantize_model(model, spec, args.method, samples, awq, args.quantize_lm_head)
    settings = {
        "method": args.method,
        "bits": args.bits,
        "group_size": args.group_size if args.bits == 4 else None,
    }
    if samples:
        settings["calibration"] = {
            "text": args.calib or "pydoc_data.topics, first 80%",
            "n_samples": args.n_samples,
            "seq_len": args.seq_len,
        }
        settings["awq"] = asdict(awq)
        # the scale search's block output error over the calibration tokens, summed over the layers
        settings["awq"]["search_loss_vs_rtn"] = {
            group: round(sum(s[group][1] for s in stats) / sum(s[group][0] for s in stats), 4)
            for group in stats[0]
        }
    seconds = time.perf_counter() - start
    settings.update(
        command=shlex.join(["perfxllm", *sys.argv[1:]]), device=device.type, seconds=round(seconds)
    )
    save_quantized(model, ckpt, out, settings)
    lm_head = "tied to the embeddings" if ckpt.config.tie_word_embeddings else "dense"
    if args.quantize_lm_head and not ckpt.config.tie_word_embeddings:
        lm_head = "quantized"
    print(
        f"wrote {out}: {args.method} int{args.bits} ({_formats_used(model)}) in {seconds:.0f} s on "
        f"{device.type}; embeddings dense, lm_head {lm_head}",
        file=sys.stderr,
    )
    return 0


def _formats_used(model) -> str:
    """ "int4 g64: qkv, o, gate_up; int4 g128: down": the group size falls back where it does not divide."""
    from perfxllm.quant.awq import layer_projections

    by_format: dict[str, list[str]] = {}
    for name, lin in layer_projections(model.layers[0]).items():
        by_format.setdefault(lin.weight.format_name, []).append(name)
    return "; ".join(f"{fmt}: {', '.join(names)}" for fmt, names in by_format.items())
