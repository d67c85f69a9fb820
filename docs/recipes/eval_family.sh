#!/usr/bin/env bash
# The evaluation of a distilled family recorded in docs/evaluation.md: every size on held-out text,
# four multiple-choice sets (20 items each) and cost, then the two baselines at 16, 20, 24 and 28 layers.
set -euo pipefail
student=$1; out=$2
evaldata=${EVALDATA:-../shared/data/eval}
heldout=${HELDOUT:-../shared/data/lm/tinyshakespeare_input.txt}
tasks=arc_easy_test,piqa_valid_mc,openbookqa_test,winogrande_dev
common=(--tasks "$tasks" --data-dir "$evaldata" --limit 20 --heldout-data "$heldout" --cost --out "$out")
.venv/bin/boomerang eval "$student" "${common[@]}" --sizes all
.venv/bin/boomerang eval "$student" "${common[@]}" --sizes 16,20,24,28 --baselines undistilled,drop-bi
