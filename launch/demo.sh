#!/usr/bin/env bash
# make demo: the trainer on NP ranks (default 4) under horovodrun with Gloo, one torch
# thread each: configs/demo.yaml with its aggregator (FA) and with mean, then a plot.
# Extra arguments go to fa-hvd-demo (e.g. --set train.epochs=10).
set -euo pipefail
cd "$(dirname "$0")/.."
np="${1:-4}"
shift || true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec fa-hvd-demo --np "$np" "$@"
