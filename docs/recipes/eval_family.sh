#!/usr/bin/env bash
# The evaluation of a distilled family recorded in docs/evaluation.md: every size on held-out text,
# four multiple-choice sets (20 items each) and cost, then the two baselines at 16, 20, 24 and 28 layers.
set -euo pipefail
export BOOMERANG_DTYPE="${BOOMERANG_DTYPE:-float32}"  # the recorded numbers were measured in float32
student=$1; out=$2
evaldata=${EVALDATA:?set EVALDATA to a folder of lm-eval-style .jsonl task files}
heldout=${HELDOUT:?set HELDOUT to a plain-text corpus, e.g. tinyshakespeare input.txt}
tasks=arc_easy_test,piqa_valid_mc,openbookqa_test,winogrande_dev
common=(--tasks "$tasks" --data-dir "$evaldata" --limit 20 --heldout-data "$heldout" --cost --out "$out")
.venv/bin/boomerang eval "$student" "${common[@]}" --sizes all
.venv/bin/boomerang eval "$student" "${common[@]}" --sizes 16,20,24,28 --baselines undistilled,drop-bi
