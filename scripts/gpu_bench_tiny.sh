#!/usr/bin/env bash
# The tiny policy's bench on a CUDA GPU: batch 1, 8, 32, 128; speculation off / fixed 4 / fixed 8 /
# entropy (and transformers' generate), bf16, 3 rounds each. The first call builds the tiny policy
# and fits its 8-depth heads (cached in $SPECROLL_CACHE, default ~/.cache/specroll).
#   scripts/gpu_bench_tiny.sh [OUT_DIR]   (default gpu-bench-tiny/: one JSON per batch size and bench.txt)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-bench-tiny}; mkdir -p "$out"
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for bp in 1:16 8:64 32:64 128:256; do
  b=${bp%%:*}; p=${bp##*:}
  $py -m experiments.cli bench --device cuda --dtype bfloat16 --batch "$b" --prompts "$p" --repeats 3 \
    --spec off fixed:4 fixed:8 entropy heads.num_depths=8 --json "$out/tiny-b$b.json" 2>&1 \
    | grep -v -i "warn" | tail -12 | tee -a "$out/bench.txt"
done
