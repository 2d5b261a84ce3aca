#!/usr/bin/env bash
# Every GPU check and benchmark, stage by stage, into one folder and one archive of it.
#
#   PYTHONPATH=. bash scripts/gpu_all.sh OUT [STAGE ...]
#
# Stages (default: all, in this order): tests engine kernels e2e offline online steps
#   tests    the GPU-marked tests and the kernel tests on the GPU
#   engine   scripts/gpu_check_engine.py: CPU vs GPU greedy tokens (random default-shaped model; also a slice
#            of the real model where $SLICE_GGUF names one, from scripts/slice_gguf.py)
#   kernels  perfxllm bench kernels
#   e2e      perfxllm bench e2e: int4 and fp16, batch 1..64, transformers baseline
#   offline  perfxllm bench serve --offline: Llama-3-8B shape, fp16 and int4, 1000 requests
#   online   perfxllm bench serve against a live server: 1, 16, 64 and 256 streams
#   steps    scripts/profile_serve_steps.py: the offline run step by step
# Each stage's log is OUT/<stage>.log; OUT.tgz holds everything after every stage (a machine that returns
# few files, or stops a command at a time limit, still hands back what finished).
set -u
out=$1
shift
stages=${*:-tests engine kernels e2e offline online steps}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PERFXLLM_CACHE_DIR=${PERFXLLM_CACHE_DIR:-$out/cache}
serve="python -m perfxllm bench serve --random-weights llama3-8b --device cuda --dtype float16
       --input-len 200 --output-len 150"
# vLLM's limits on a GPU of 70 GB or more: 1024 sequences and 16384 tokens a step offline (its LLM class), 8192
# tokens for its server, where 256 sequences cover the largest concurrency here
offline_limits="--max-num-seqs 1024 --max-num-batched-tokens 16384"
online_limits="--max-num-seqs 256 --max-num-batched-tokens 8192"
start=$(date +%s)
for stage in $stages; do
    case $stage in
        tests) python -m pytest -q -p no:cacheprovider -m gpu tests/engine tests/kernels
               python -m pytest -q -p no:cacheprovider tests/kernels ;;
        engine) python scripts/gpu_check_engine.py ${SLICE_GGUF:+--gguf "$SLICE_GGUF"} --out "$out/engine-check.json" ;;
        kernels) python -m perfxllm bench kernels --out-dir "$out" ;;
        e2e) python -m perfxllm bench e2e --device cuda --quant int4 fp16 --repeats 2 --sweep --hf --out-dir "$out" ;;
        offline) $serve $offline_limits --offline --num-requests 1000 --result-dir "$out/offline-fp16"
                 $serve $offline_limits --offline --num-requests 1000 --quantization int4 \
                     --result-dir "$out/offline-int4" ;;
        online) $serve $online_limits --num-requests 256 --concurrency 256 64 16 --result-dir "$out/online"
                $serve $online_limits --num-requests 12 --concurrency 1 --result-dir "$out/online-1" ;;
        steps) python scripts/profile_serve_steps.py $offline_limits --profile-after 12 --out "$out/serve-steps.json" ;;
        *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac > "$out/$stage.log" 2>&1
    echo "== $stage exit $? at $(( $(date +%s) - start )) s"
    tail -n 4 "$out/$stage.log"
    tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"
done
