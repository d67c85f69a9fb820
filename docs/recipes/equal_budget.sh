#!/usr/bin/env bash
# Equal *total* budget: is one family (one run, every size) better than K students distilled at K sizes with 1/K of
# its budget each? Distills the family (the fidelity study's 1x by default), then `boomerang baselines --split`
# (K students, round(STEPS/K) steps each, the family's data, seed and batch), evaluates all of them alike
# (label-free: the run's held-out split and the shipped WikiText-2 test excerpt) and prints the equal-budget lines.
# Usage: docs/recipes/equal_budget.sh RECIPE STEPS      e.g. docs/recipes/equal_budget.sh cpu 150  (under an hour here)
#   env: RUNS (default /tmp/eqb), DATA (WikiText-2 valid as text: required), BATCH (8), SEQ (128), SIZES
#        (comma-separated; default three spread over the family), DEVICE (cpu) for the evaluation, FLAGS (more
#        distill flags). A family already distilled is not distilled again.
set -euo pipefail
export BOOMERANG_DTYPE="${BOOMERANG_DTYPE:-float32}"  # the recorded numbers were measured in float32
. "$(dirname "$0")/quiet.sh"
recipe=${1:?usage: $0 RECIPE STEPS} steps=${2:?usage: $0 RECIPE STEPS}
data=${DATA:?set DATA to WikiText-2 valid as text, e.g. wiki.valid.tokens of wikitext-2-v1}
run=${RUNS:-/tmp/eqb}/$recipe-$steps
B=.venv/bin/boomerang
start=$(date +%s)
if [ ! -f "$run/student/manifest.json" ]; then
  # shellcheck disable=SC2086  # FLAGS is a list of flags
  quiet 'distill: ' $B distill --recipe "$recipe" --data "$data" --out "$run" --steps "$steps" \
    --batch-size "${BATCH:-8}" --seq-len "${SEQ:-128}" --checkpoint-every 50 ${FLAGS:-}
  echo "== family: $(( $(date +%s) - start )) s"
fi
start=$(date +%s)
quiet 'distill: ' $B baselines "$run/student" --split ${SIZES:+--sizes "$SIZES"}
echo "== split students: $(( $(date +%s) - start )) s"
start=$(date +%s)
quiet eval $B eval "$run/student" --heldout-data "$run/student/heldout-tokens.pt" --general-data shipped \
  --device "${DEVICE:-cpu}" --out "$run/student/eval"
echo "== evaluation: $(( $(date +%s) - start )) s"
$B compare "$run/student" --out "$run/compare" | { grep -E "equal|budget|^table" || true; }
