#!/usr/bin/env bash
# After docs/recipes/fidelity.sh: the distilled-at-size baselines of one family, the label-free evaluation of
# every family (its run's held-out split and WikiText-2 test, KL and top-1, beside undistilled, drop-bi and the
# distilled-at-size students), the ends conventions, and one chart with one Pareto frontier over everything.
# Usage: docs/recipes/fidelity_eval.sh BASELINE_RUN RUN [RUN...]     (runs under $RUNS, default /tmp/fid)
#        SIZES=20,23 for other distilled-at-size sizes; SKIP_BASELINES=1 to use the ones already made
set -euo pipefail
export BOOMERANG_DTYPE="${BOOMERANG_DTYPE:-float32}"  # the recorded numbers were measured in float32
. "$(dirname "$0")/quiet.sh"
runs=${RUNS:-/tmp/fid}
base=$1; shift
t() { local s=$(date +%s); "$@"; echo "   ($(( $(date +%s) - s )) s: $*)"; }
if [ "${SKIP_BASELINES:-0}" != 1 ]; then
  quiet 'distill: ' t .venv/bin/boomerang baselines "$runs/$base/student" ${SIZES:+--sizes $SIZES}
fi
names=()
for run in "$base" "$@"; do
  st=$runs/$run/student
  quiet eval t .venv/bin/boomerang eval "$st" --heldout-data "$st/heldout-tokens.pt" --general-data shipped \
    --baselines undistilled,drop-bi --out "$st/eval"
  names+=("$st")
done
for ends in auto teacher; do
  st=$runs/$base/student
  quiet eval t .venv/bin/boomerang eval "$st" --heldout-data "$st/heldout-tokens.pt" --general-data shipped \
    --ends "$ends" --out "$runs/$base-ends-$ends"
  names+=("$runs/$base-ends-$ends")
done
.venv/bin/boomerang compare "${names[@]}" --out "$runs/compare"
