#!/usr/bin/env bash
# Set up, then run the offline demo: tiny checkpoints -> loaded through the plugins -> fine-tuned -> saved -> reloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
HF_HUB_OFFLINE=1 lmport plugins
HF_HUB_OFFLINE=1 lmport demo "$@"
