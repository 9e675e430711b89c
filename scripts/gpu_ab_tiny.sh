#!/usr/bin/env bash
# A/B of two trees on a lent GPU, in one call: the engine's CUDA tests on this tree (its whole suite in
# bf16, then the gpu-marked tests), then the tiny
# policy's bench (off / fixed 8 / entropy, bf16, 3 rounds, no HF) at each batch size, the base
# tree and this tree in turn, so both meet the same card at the same minutes. JSON and logs under $OUT.
# Needs, carried with the call: .whl (../shared/tools/device-wheels), .devcache/models with the tiny
# policy and its 8-depth heads (copied from ~/.cache/specroll/models) and the base tree in .ab/base
# (`git archive BASE | tar -x -C .ab/base`).  BATCHES="1:16 32:64 128:256" (batch:prompts) by default.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled SPECROLL_CACHE=$PWD/.devcache
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
echo "base ${BASE_COMMIT:-unknown} new ${COMMIT:-unknown}" | tee -a "$out/gpu.txt"
here=$PWD
# the engine's whole suite on CUDA in bf16 (batch independence, exactness), then the gpu-marked tests:
# the gpu marker alone missed a drafting change that made a row's drafts depend on the batch's size in bf16
SPECROLL_TEST_DEVICE=cuda SPECROLL_TEST_DTYPE=bfloat16 PYTHONPATH=/tmp/site:$here python3 -m pytest -q \
  -p no:cacheprovider tests/rollout/test_engine.py 2>&1 | tail -3 | tee -a "$out/gpu.txt"
PYTHONPATH=/tmp/site:$here python3 -m pytest -q -m gpu -p no:cacheprovider tests/rollout/test_engine.py \
  tests/spec_heads 2>&1 | tail -3 | tee -a "$out/gpu.txt"
for bp in ${BATCHES:-1:16 32:64 128:256}; do
  b=${bp%%:*}; p=${bp##*:}
  for tree in base new; do
    dir=$here; [ $tree = base ] && dir=$here/.ab/base
    (cd "$dir" && PYTHONPATH=/tmp/site:$dir python3 -m experiments.cli bench --device cuda --dtype bfloat16 \
      --batch "$b" --prompts "$p" --repeats 3 --no-hf --spec off fixed:8 entropy heads.num_depths=8 \
      --json "$out/tiny-$tree-b$b.json" 2>&1 | grep -v -i "warn" | tail -9 | tee -a "$out/bench-$tree.txt")
  done
done
