#!/usr/bin/env bash
# One GPU session: the engine's and the sampler's tests on CUDA (fp32, then bf16).
# On the lent GPU machine, from the repo root, with the wheel set in .whl (../shared/tools/device-wheels).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
for dt in float32 bfloat16; do
  echo "== engine tests on cuda, $dt"
  SPECROLL_TEST_DEVICE=cuda SPECROLL_TEST_DTYPE=$dt python3 -m pytest -q -p no:cacheprovider \
    tests/rollout/test_engine.py -rf 2>&1 | tee "$out/engine_$dt.txt" | tail -25
done
echo "== sampler tests (gpu marker included)"
python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/spec_heads/test_rejection.py 2>&1 | tail -3 | tee "$out/rejection.txt"
