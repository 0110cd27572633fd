#!/usr/bin/env bash
# Create .venv (if missing) and install lmport (with its GGUF extra, for the demo), its first-party plugins and the
# test tools into it.
# Installs the CPU build of torch first, so nothing pulls a multi-GB CUDA wheel on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" \
  || python -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<3"
python -m pip install -q -e ".[test,gguf]" -e plugins_llama -e plugins_gpt2 -e plugins_mistral
