#!/usr/bin/env bash
# The optional llama.cpp extra: llama-cpp-python built from its source distribution on PyPI (which builds
# llama.cpp itself, CPU only unless CMAKE_ARGS says otherwise; ~7 minutes on 2 cores, once: the wheel is
# cached by pip). It lets `boomerang export --format gguf --type q4_k_m` use llama.cpp's quantizer and the
# llama.cpp tests run the exported files. Never a downloaded binary.
#
#   bash scripts/install_llamacpp.sh     # into .venv (run scripts/setup.sh --install first)
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-0.3.36}
[ -x .venv/bin/python ] || { echo "error: no .venv here; run: bash scripts/setup.sh --install" >&2; exit 1; }
if .venv/bin/python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $LLAMA_CPP_VERSION is installed"; exit 0
fi
for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "error: building llama.cpp needs $tool (Debian: apt-get install cmake g++)" >&2; exit 1; }
done
echo "==> building llama.cpp through llama-cpp-python $LLAMA_CPP_VERSION (first time: minutes)"
constraint=()
[ -f .venv/torch-constraint.txt ] && constraint=(-c .venv/torch-constraint.txt)
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  .venv/bin/python -m pip --disable-pip-version-check -q install "${constraint[@]}" --no-binary llama-cpp-python \
  "llama-cpp-python==$LLAMA_CPP_VERSION"
.venv/bin/python -c "import llama_cpp; print('llama.cpp ready: llama-cpp-python', llama_cpp.__version__)"
