#!/usr/bin/env bash
# One recipe try: distill the default teacher on TinyShakespeare (the first 90% of its tokens), then
# measure every size of the family (last-k order) on 4,096 held-out tokens (the last 10%) and on
# 4,096 tokens of another domain (TinyStories valid). The flags change the paper's recipe.
# Usage: docs/recipes/try.sh NAME [distill flags...]      (SKIP_OTHER=1: the training domain only)
set -euo pipefail
export BOOMERANG_DTYPE="${BOOMERANG_DTYPE:-float32}"  # the recorded numbers were measured in float32
. "$(dirname "$0")/quiet.sh"
name=$1; shift
data=${DATA:?set DATA to a plain-text corpus, e.g. tinyshakespeare input.txt}
other=${OTHER:?set OTHER to a text of another domain, e.g. a TinyStories validation sample}
out=${TRIES:-/tmp/tries}/$name
start=$(date +%s)
quiet 'distill: ' .venv/bin/boomerang distill --recipe paper --data "$data" --out "$out" --steps 150 --batch-size 8 \
  --seq-len 128 --checkpoint-every 50 "$@"
echo "wall time: $(( $(date +%s) - start )) s"
echo "== $name: held-out (same domain)"
.venv/bin/boomerang heldout --student "$out/student" --data "$data" --tokens 4096
if [ "${SKIP_OTHER:-0}" != 1 ]; then
  echo "== $name: other domain"
  .venv/bin/boomerang heldout --student "$out/student" --data "$other" --tokens 4096
fi
