#!/usr/bin/env bash
# The best-order measurement of docs/evaluation.md ("The patch order: the best measured per size"): the quick
# start's family, its order chosen as it is saved, then KL to the teacher per size in the best order and in
# last-k, beside drop-bi, on the run's held-out text, the shipped general text and a text of another domain.
#
#   OTHER=us_inaugural_addresses_1789-2021.txt bash docs/recipes/best_order.sh
#   env: RUNS (default /tmp/best-order), OTHER (a text file of another domain: required; its last 10 % is read)
set -euo pipefail
export BOOMERANG_DTYPE="${BOOMERANG_DTYPE:-float32}"  # the recorded numbers were measured in float32
cd "$(dirname "$0")/../.."
source docs/recipes/quiet.sh
other=${OTHER:?set OTHER to a text of another domain, e.g. the US inaugural addresses 1789-2021 as plain text}
runs=${RUNS:-/tmp/best-order}
B=.venv/bin/boomerang
S=$runs/run/student
start=$(date +%s)
[ -f "$S/boomerang.json" ] || quiet "distill: " $B distill --recipe cpu --data teacher --teacher-docs 32 --steps 40 \
  --checkpoint-every 10 --out "$runs/run" --no-evaluate
echo "distill wall: $(( $(date +%s) - start )) s"
$B family --student "$S"
for order in best last; do
  quiet "eval: " $B eval "$S" --order $order --heldout-data "$S/heldout-tokens.pt" --general-data shipped \
    --baselines drop-bi --out "$runs/eval-$order"
  quiet "eval: " $B eval "$S" --order $order --heldout-data "$other" --baselines drop-bi --out "$runs/other-$order"
done
echo "total wall: $(( $(date +%s) - start )) s"
