#!/usr/bin/env bash
# The fidelity runs of docs/evaluation.md: distill the default teacher on general text (WikiText-2 valid)
# with a recipe at a token budget, keeping the run folder for its evaluation and its baselines.
# Usage: docs/recipes/fidelity.sh NAME RECIPE STEPS [distill flags...]
#   1x budget = 150 steps of 8 x 128 tokens (153,600 tokens, the distillation notes' CPU budget); 4x = 600.
set -euo pipefail
export BOOMERANG_DTYPE="${BOOMERANG_DTYPE:-float32}"  # the recorded numbers were measured in float32
. "$(dirname "$0")/quiet.sh"
name=$1 recipe=$2 steps=$3; shift 3
data=${DATA:?set DATA to WikiText-2 valid as text, e.g. wiki.valid.tokens of wikitext-2-v1}
out=${RUNS:-/tmp/fid}/$name
start=$(date +%s)
quiet 'distill: ' .venv/bin/boomerang distill --recipe "$recipe" --data "$data" --out "$out" --steps "$steps" \
  --batch-size 8 --seq-len 128 --checkpoint-every 50 "$@"
echo "== $name: wall time $(( $(date +%s) - start )) s"
