#!/usr/bin/env bash
# Sharded vs allgather vs Horovod's allreduce as the world grows: `fa-hvd-bench step` (ResNet-18 on
# the CPU, Gloo) at p = 2, 4, 8 with both exchanges and at p = 16 with the sharded one only (16
# allgather ranks would hold 16 x 2 x 45 MB of gathered gradients each: more than this machine's
# memory), then a table of the step times, the bytes per rank per step the kernel counted, the
# cost model beside them, and the exchange's memory.
# Usage: benchmarks/sharded_scaling.sh [OUT.jsonl [EXTRA fa-hvd-bench step ARGS...]]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/runs/bench/sharded_scaling.jsonl}
extra=("${@:2}")
export PATH=$root/.venv/bin:$PATH OMP_NUM_THREADS=1
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
mkdir -p "$(dirname "$out")"
: >"$out"
for p in 2 4 8 16; do
    exchanges=allgather,sharded
    [ "$p" -ge 16 ] && exchanges=sharded
    echo "== p = $p: $exchanges ==" >&2
    horovodrun -np "$p" -H "localhost:$p" --gloo fa-hvd-bench step --exchange "$exchanges" \
        --rounds 3 --steps 2 "${extra[@]}" 2>/dev/null | sed 's/^\[[0-9]*\]<stdout>://' | grep '"bench": "step"' >>"$out"
done
"$root/.venv/bin/python" - "$out" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "variant" in r]
print("| p | variant | step s | vs Horovod | sent MB/rank/step | received | model | exchange memory MB (model) |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["variant"] == "fa_hvd_mean_one_bucket":
        continue
    peak = r["exchange_peak_bytes"]
    memory = f"{peak / 1e6:.0f} ({r['model_exchange_bytes'] / 1e6:.0f})" if peak else f"({r['model_exchange_bytes'] / 1e6:.0f})"
    print(f"| {r['ranks']} | {r['variant']} | {r['median_s']:.3f} | {r['vs_horovod']:.2f} | "
          f"{r['bytes_sent_per_rank_per_step'] / 1e6:.1f} | {r['bytes_received_per_rank_per_step'] / 1e6:.1f} | "
          f"{r['model_bytes_per_rank_per_step'] / 1e6:.1f} | {memory} |")
PY
echo "results: $out" >&2
