#!/usr/bin/env bash
# Fit SmolLM2-135M-Instruct's draft heads on a lent GPU in two stages (KL warm-up then TV, then TV
# on fresh samples at a higher lr), and hand them back under $OUT in 15 MB parts
# (cat $OUT/heads.tar.part* | tar x). Needs the wheels in WHEELS (default .smol/w) and the GGUF at
# GGUF=... (see scripts/gpu_bench_smollm2.sh). STEPS2 / SEQS2 size the second stage. Arguments are
# overrides for both stages, e.g. heads.num_depths=8.
set -uo pipefail
WHEELS=${WHEELS:-.smol/w} source "$(dirname "$0")/gpu_smollm2_env.sh"
fit() { python3 -m experiments.cli fit-heads --config smollm2-gsm8k model.dtype=float32 fit.micro_batch_size=32 \
          fit.eval_every=200 "$@" "${extra[@]}" 2>&1 | grep -v -i warn; }
extra=("$@"); set --
t0=$(date +%s)
fit heads_path=/tmp/heads1 fit.num_sequences=1024 fit.steps=800 fit.kl_warmup_steps=150 rollout.max_batch=128 \
  | tee "$out/fit1.txt" | grep -E "acc|held|saved|Error" | tail -8
t1=$(date +%s); echo "stage 1: $((t1 - t0)) s" | tee -a "$out/gpu.txt"
fit heads_path=/tmp/heads2 fit.init=/tmp/heads1 fit.num_sequences=${SEQS2:-3072} fit.steps=${STEPS2:-2400} \
  fit.kl_warmup_steps=0 fit.lr=2e-3 rollout.max_batch=256 | tee "$out/fit2.txt" | grep -E "acc|held|saved|Error" | tail -8
t2=$(date +%s); echo "stage 2: $((t2 - t1)) s" | tee -a "$out/gpu.txt"
d=/tmp/heads2; [ -d "$d" ] || d=/tmp/heads1
tar cf - -C "$(dirname $d)" "$(basename $d)" | split -b 15000000 - "$out/heads.tar.part"
ls -la "$out"
