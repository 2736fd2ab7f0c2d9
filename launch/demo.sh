#!/usr/bin/env bash
# Run the demo job on this machine: NP ranks (default 4) under horovodrun.
# Extra arguments go to fa-hvd-demo (e.g. --aggregator krum --f 1).
set -euo pipefail
cd "$(dirname "$0")/.."
np="${1:-4}"
shift || true
exec horovodrun -np "$np" -H "localhost:$np" fa-hvd-demo --config configs/demo.yaml "$@"
