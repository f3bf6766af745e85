#!/usr/bin/env bash
# Rebuild the starter model in src/grpokit/assets/starter (a few minutes on a 2-core CPU).
#   scripts/make_starter_model.sh [key=value ...]      e.g. max_steps=100 output_dir=/tmp/starter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" scripts/make_starter_model.py configs/starter_sft.yaml "$@"
