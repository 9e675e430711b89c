#!/usr/bin/env bash
# Fit SmolLM2-135M-Instruct's draft heads on a CUDA GPU in two stages: KL warm-up then TV on 1024
# samples, then TV on fresh samples at a higher lr, continuing from stage 1.
#   scripts/gpu_fit_smollm2.sh OUT_DIR [key=value ...]   (e.g. heads.num_depths=4)
# The heads land in OUT_DIR/heads (stage 1 in OUT_DIR/heads-stage1); SEQS2 / STEPS2 size stage 2.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_fit_smollm2.sh OUT_DIR [key=value ...]}; shift; mkdir -p "$out"
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
fit() { $py -m experiments.cli fit-heads --config smollm2-gsm8k model.dtype=float32 fit.micro_batch_size=32 \
          fit.eval_every=200 "$@" 2>&1 | grep -v -i warn; }
t0=$(date +%s)
fit heads_path="$out/heads-stage1" fit.num_sequences=1024 fit.steps=800 fit.kl_warmup_steps=150 \
  rollout.max_batch=128 "$@" | tee "$out/fit1.txt" | grep -E "acc|held|saved|Error" | tail -8
t1=$(date +%s); echo "stage 1: $((t1 - t0)) s" | tee -a "$out/gpu.txt"
fit heads_path="$out/heads" fit.init="$out/heads-stage1" fit.num_sequences=${SEQS2:-3072} \
  fit.steps=${STEPS2:-2400} fit.kl_warmup_steps=0 fit.lr=2e-3 rollout.max_batch=256 "$@" \
  | tee "$out/fit2.txt" | grep -E "acc|held|saved|Error" | tail -8
t2=$(date +%s); echo "stage 2: $((t2 - t1)) s" | tee -a "$out/gpu.txt"
