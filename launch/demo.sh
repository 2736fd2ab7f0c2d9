#!/usr/bin/env bash
# Run the demo job on this machine: NP ranks (default 4) under horovodrun with Gloo,
# one torch thread each. Extra arguments go to fa-hvd-demo
# (e.g. --aggregator mean --f 1).
set -euo pipefail
cd "$(dirname "$0")/.."
np="${1:-4}"
shift || true
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec horovodrun -np "$np" -H "localhost:$np" --gloo fa-hvd-demo --config configs/demo.yaml "$@"
