#!/usr/bin/env bash
# Students distilled at sizes of a fidelity family whose run folder is gone (its numbers kept in families.csv):
# start the family's run again and stop it after its first step (the same seed, data and recipe give the same
# plan, which is measured before the first step), open that checkpoint as a student folder, and distill the
# sizes it implies with the run's own recipe, data and budget. Then evaluate only them (and the teacher, the
# shared reference): the one-step family itself is not a result and is never evaluated.
# Usage: docs/recipes/at_size_only.sh NAME RECIPE STEPS SIZE [SIZE...]      (run folder $RUNS/NAME, default /tmp/fid)
#   e.g. docs/recipes/at_size_only.sh cpu-4x cpu 600 23 27
# Results go to $RUNS/NAME-at-size, which compare pairs with NAME's sizes; TAG=23 writes NAME-at-size-23 instead,
# for a later batch when a table already holds a NAME-at-size family (compare refuses two families of one name).
set -euo pipefail
export BOOMERANG_DTYPE="${BOOMERANG_DTYPE:-float32}"  # the recorded numbers were measured in float32
. "$(dirname "$0")/quiet.sh"
name=$1 recipe=$2 steps=$3; shift 3
run=${RUNS:-/tmp/fid}/$name
B=.venv/bin/boomerang
mkdir -p "$(dirname "$run")"
touch "$run.stop"
# the family's own run (fidelity.sh: same data, batch, length, checkpoints), stopped by the stop file at step 1
"$(dirname "$0")/fidelity.sh" "$name" "$recipe" "$steps" --stop-file "$run.stop"
rm -f "$run.stop"
$B snapshot "$run" --out "$run/student"
cat "$run/plan.json"; echo
for n in "$@"; do  # one at a time, so the first size's numbers come first
  start=$(date +%s)
  quiet 'distill: ' $B baselines "$run/student" --sizes "$n"
  echo "== $name at $n layers: wall time $(( $(date +%s) - start )) s"
done
teacher=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['n_teacher'])" "$run/plan.json")
start=$(date +%s)
quiet eval $B eval "$run/student" --sizes "$teacher" --heldout-data "$run/student/heldout-tokens.pt" \
  --general-data shipped --out "$run-at-size${TAG:+-$TAG}"
echo "== evaluation of the teacher and the students at $*: $(( $(date +%s) - start )) s"
