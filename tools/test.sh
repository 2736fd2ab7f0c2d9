#!/usr/bin/env bash
# `make test`: the whole suite, in two pytest processes side by side.
#
# The side process runs the tests that mostly wait, started first, beside every other test:
# tests/test_multinode.py (jobs across the three-node cluster of network namespaces: 8-10
# minutes, most of them spent on the timeouts that make its faults real, Gloo's, SLURM's
# node-down detection, rejoining ranks), then tests/test_train_elastic.py (elastic jobs that
# wait for Gloo's 30 s timeout and for Horovod to re-form the world: about 1.1 of the 2 cores
# alone), tests/test_checkpoint_large.py (a 3 GiB checkpoint, mostly the kernel's page
# copies) and, last, tests/test_train_resume.py (chains of interrupted runs, about 1.5 cores
# alone, no time bound: they fill the minutes in which the rest would otherwise run alone).
# Its output (with the times its tests print against their bounds) goes to
# build/test-side.log and is printed once the rest is done. The status is the rest's
# when it fails, else the side process's.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PY=.venv/bin/python
SIDE=(tests/test_multinode.py tests/test_train_elastic.py tests/test_checkpoint_large.py tests/test_train_resume.py)
LOG=build/test-side.log
mkdir -p build

"$PY" -m pytest -q -rP -p no:cacheprovider --durations=10 "${SIDE[@]}" > "$LOG" 2>&1 &
side=$!
trap 'kill -TERM "$side" 2>/dev/null; wait "$side"; exit 130' INT TERM  # a background job ignores SIGINT

"$PY" -m pytest -q --durations=25 "${SIDE[@]/#/--ignore=}"
rest=$?

if kill -0 "$side" 2>/dev/null; then
  echo "[make test] waiting for ${SIDE[*]} (run beside the rest; log: $LOG)"
fi
wait "$side"
side_status=$?
echo "[make test] ${SIDE[*]}, run beside the rest ($LOG):"
cat "$LOG"
[ "$rest" -ne 0 ] && exit "$rest"
exit "$side_status"
