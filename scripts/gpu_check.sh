#!/usr/bin/env bash
# The engine's and the sampler's tests on a CUDA GPU: the engine suite in fp32, then in bf16
# (batch independence, exactness, greedy equality), then the sampler tests with the gpu marker.
#   scripts/gpu_check.sh [OUT_DIR]      (default gpu-check/; run from the repo root, in the
#                                        environment scripts/setup.sh made with a CUDA torch)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}; mkdir -p "$out"
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
for dt in float32 bfloat16; do
  echo "== engine tests on cuda, $dt"
  SPECROLL_TEST_DEVICE=cuda SPECROLL_TEST_DTYPE=$dt $py -m pytest -q -p no:cacheprovider \
    tests/rollout/test_engine.py -rf 2>&1 | tee "$out/engine_$dt.txt" | tail -25
done
echo "== sampler tests (gpu marker included)"
$py -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/spec_heads/test_rejection.py 2>&1 \
  | tee "$out/rejection.txt" | tail -3
