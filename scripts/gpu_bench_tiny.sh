#!/usr/bin/env bash
# The tiny policy's bench on a lent GPU: batch 1, 8, 32, 128, speculation off / fixed 4 / fixed 8 /
# entropy against transformers' generate, 3 rounds each; JSON rows and logs under $OUT.
# Needs, carried with the call: .whl (../shared/tools/device-wheels) and .devcache/models with the
# tiny policy and its 8-depth heads (copied from ~/.cache/specroll/models). COMMIT=... names the commit
# in gpu.txt (the device machine's copy of the tree carries no git history of its own).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled SPECROLL_CACHE=$PWD/.devcache
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
echo "commit ${COMMIT:-unknown}" | tee -a "$out/gpu.txt"
for bp in 1:16 8:64 32:64 128:256; do
  b=${bp%%:*}; p=${bp##*:}
  python3 -m experiments.cli bench --device cuda --dtype bfloat16 --batch "$b" --prompts "$p" --repeats 3 \
    --spec off fixed:4 fixed:8 entropy heads.num_depths=8 --json "$out/tiny-b$b.json" 2>&1 \
    | grep -v -i "warn" | tail -12 | tee -a "$out/bench.txt"
done
