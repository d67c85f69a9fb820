# Sourced by the recipe scripts beside it. `quiet PREFIX CMD...` runs CMD with its progress bars left out of the
# log (carriage returns split into lines; lines starting with PREFIX, progress lines (" · ETA ") and blank ones
# dropped) and keeps CMD's exit status, so a
# script under `set -eo pipefail` stops when a run fails instead of timing and evaluating a run that never was.
quiet() {
  local prefix=$1; shift
  "$@" 2>&1 | tr '\r' '\n' | { grep -v -e "^$prefix" -e ' · ETA ' -e '^ *$' || true; }  # grep finds no line to keep: not a failure
}
