#!/usr/bin/env bash
# A new user's first run, timed: `git clone`, the README's first command, the wait until the Compare tab
# shows a first (partial) chart, and until it is complete (the quick-start distillation and its standard
# evaluation both SUCCEEDED).
#
#   bash bench/first_run.sh [REPO] [WORKDIR]     # REPO: what to clone (default: this checkout)
#
# Everything happens in WORKDIR (default: a new temporary folder): the clone, its .venv, and a fresh
# BOOMERANG_HOME, so the teacher is converted and the corpus written as on a new machine. pip still
# takes wheels from this machine's cache where it has them. Redis must be reachable (setup.sh starts
# it when installed). Prints one line per milestone with the minutes since the clone started, then
# the jobs as `boomerang jobs` shows them, and stops the worker and the dashboard it started.
set -euo pipefail
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
work=${2:-$(mktemp -d /tmp/boomerang-first-run-XXXX)}
export BOOMERANG_HOME="$work/home" BOOMERANG_PORT=${BOOMERANG_PORT:-7861} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset DATABASE_URL
start=$(date +%s)
stamp() { awk -v s="$start" -v now="$(date +%s)" -v what="$1" 'BEGIN { printf "%6.1f min  %s\n", (now - s) / 60, what }'; }

git clone -q "$repo" "$work/clone"
cd "$work/clone"
stamp "cloned into $work/clone"
setsid bash scripts/setup.sh > "$work/setup.log" 2>&1 &
setup=$!
trap 'kill -INT -- -$setup 2>/dev/null || true; sleep 3; kill -TERM -- -$setup 2>/dev/null || true' EXIT

until curl -fs -o /dev/null "http://127.0.0.1:$BOOMERANG_PORT/"; do
  kill -0 $setup 2>/dev/null || { echo "setup.sh ended early; see $work/setup.log" >&2; tail -20 "$work/setup.log" >&2; exit 1; }
  sleep 2
done
stamp "dashboard up (setup.sh done: venv, install, teacher converted, worker started, job queued)"

status() {  # the status of job $1, or "-" before it exists: read from the SQLite file with the system's
  # python3 and sqlite3 (no torch import), every 15 s, so the watching costs the two cores next to nothing
  python3 -c "import sqlite3,sys; r=sqlite3.connect('$BOOMERANG_HOME/boomerang.db').execute('select status from jobs where id=$1').fetchone(); print(r[0] if r else '-')" 2>/dev/null || echo -
}
wait_for() {  # job id, what it is
  local s
  while :; do
    s=$(status "$1")
    case $s in
      SUCCEEDED) stamp "job $1 ($2) SUCCEEDED"; return 0 ;;
      FAILED|CANCELLED) stamp "job $1 ($2) $s"; .venv/bin/boomerang jobs; exit 1 ;;
    esac
    sleep 15
  done
}
rows() {  # evaluation rows in the results table: the Compare tab charts them as they land
  python3 -c "import sqlite3; print(sqlite3.connect('$BOOMERANG_HOME/boomerang.db').execute('select count(*) from eval_results').fetchone()[0])" 2>/dev/null || echo 0
}
wait_for 1 "the quick-start distillation"
until [ "$(rows)" -gt 0 ]; do
  case $(status 2) in FAILED|CANCELLED|SUCCEEDED) break ;; esac
  sleep 15
done
stamp "the first chart (the evaluation's first cells in the results table, marked partial on the Compare tab)"
wait_for 2 "its standard evaluation: the Compare chart is complete"
.venv/bin/boomerang jobs
