#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): distillation speed, MFU and peak memory against the estimate, placement and
# dtype checks, chunked losses, decoding, for the default teacher's shape and a 1.7B one with random weights. No
# network, no weights carried; at most ~8 minutes on one H100. Extra flags go to the script (--shapes, --json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu_check.py --device cuda "$@"
