#!/usr/bin/env bash
# `make test`: the whole suite, in two pytest processes side by side.
#
# tests/test_multinode.py (jobs across the three-node cluster of network namespaces) spends
# most of its 8-10 minutes waiting on timeouts that make its faults real (Gloo's, SLURM's
# node-down detection, rejoining ranks) and keeps about a quarter of this machine's two cores
# busy. It runs in its own pytest process, started first, beside every other test; its
# output (with the times its tests print against their bounds) goes to
# build/test-multinode.log and is printed once the rest is done. The status is the rest's
# when it fails, else the side process's.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
SIDE=tests/test_multinode.py
LOG=build/test-multinode.log
mkdir -p build

"$PY" -m pytest -q -rP -p no:cacheprovider --durations=10 "$SIDE" > "$LOG" 2>&1 &
side=$!
trap 'kill -TERM "$side" 2>/dev/null; wait "$side"; exit 130' INT TERM  # a background job ignores SIGINT

"$PY" -m pytest -q --durations=25 --ignore "$SIDE"
rest=$?

if kill -0 "$side" 2>/dev/null; then
  echo "[make test] waiting for $SIDE (run beside the rest; log: $LOG)"
fi
wait "$side"
multinode=$?
echo "[make test] $SIDE, run beside the rest ($LOG):"
cat "$LOG"
[ "$rest" -ne 0 ] && exit "$rest"
exit "$multinode"
