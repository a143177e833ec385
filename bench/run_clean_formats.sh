#!/usr/bin/env bash
# The clean benchmark for the own-data formats, in one call on one machine:
#   1. trn.json lines: prodtune at BASE (a commit) and at the working tree, alternating, ROUNDS times
#      each (the same 1.3M generated rows; CPU seconds tell more than wall time on a busy machine)
#   2. the same rows as CSV and as parquet: prodtune and pandas
#
#   bash bench/run_clean_formats.sh [BASE] [ROUNDS]      (default: the merge base with main, 3 rounds)
#
# Results go to bench/results/clean-formats-<host>/ (one JSON per run) and the tables to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-$(git merge-base HEAD main)}
ROUNDS=${2:-3}
PY=${PYTHON:-python}
OUT=bench/results/clean-formats-$(hostname)
BASE_TREE=$(mktemp -d /tmp/prodtune-base-XXXX)
trap 'rm -rf "$BASE_TREE"' EXIT
git archive "$BASE" | tar -x -C "$BASE_TREE"
mkdir -p "$OUT"
echo "base $(git rev-parse --short "$BASE") vs working tree $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')"

for round in $(seq "$ROUNDS"); do
  for side in base head; do
    echo "== trn.json, $side, round $round"
    if [ "$side" = base ]; then  # the base's bench writes its results file inside the temporary tree
      (cd "$BASE_TREE" && PYTHONPATH=src $PY bench/bench_clean.py --only prodtune)
    else
      PYTHONPATH=src $PY bench/bench_clean.py --only prodtune --out "$OUT/json-head-$round.json"
    fi | grep -E "^prodtune|^load" | tee "$OUT/json-$side-$round.txt"
  done
done
for fmt in csv parquet; do
  echo "== $fmt"
  PYTHONPATH=src $PY bench/bench_clean.py --format "$fmt" --out "$OUT/$fmt.json" | grep -vE "^(input|results)"
done
