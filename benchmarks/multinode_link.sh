#!/usr/bin/env bash
# `fa-hvd-bench step` across 2 nodes x 2 ranks of the namespace cluster (tools/cluster/cluster.sh),
# node2's link limited to each RATE in turn (tbf, both ways): Horovod's allreduce, allgather mean
# and FA, sharded mean and FA; then a table of step times and the bytes per rank per step the
# kernel counted (TCP_INFO). Brings up its own cluster (prefix fahvdbench) and takes it down.
# Usage: benchmarks/multinode_link.sh [OUT.jsonl [RATES [EXTRA fa-hvd-bench step ARGS...]]]
#   RATES: comma list, default 1gbit,10gbit
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/runs/bench/multinode_link.jsonl}
rates=${2:-1gbit,10gbit}
extra=("${@:3}")
export PATH=$root/.venv/bin:$PATH OMP_NUM_THREADS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export FA_HVD_CLUSTER_PREFIX=fahvdbench FA_HVD_CLUSTER_DIR=/tmp/fa_hvd-cluster-bench
cluster="$root/tools/cluster/cluster.sh"
mkdir -p "$(dirname "$out")"
: >"$out"
"$cluster" up 2
trap '"$cluster" down' EXIT
for rate in ${rates//,/ }; do
    "$cluster" link node2 rate "$rate"
    echo "== node2's link at $rate ==" >&2
    "$cluster" exec node1 horovodrun -np 4 -H node1:2,node2:2 --gloo --network-interface eth0 \
        fa-hvd-bench step --exchange allgather,sharded "${extra[@]}" 2>/dev/null \
        | sed 's/^\[[0-9]*\]<stdout>://' | grep '"bench": "step"' \
        | python3 -c 'import json, sys
for line in sys.stdin:
    row = json.loads(line); row["link"] = sys.argv[1]; print(json.dumps(row))' "$rate" >>"$out"
    "$cluster" link node2 clear
done
"$root/.venv/bin/python" - "$out" <<'PY'
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "variant" in r]
print("| link | variant | exchange | step s (median) | min | vs Horovod | sent MB/rank/step | received | model |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["variant"] == "fa_hvd_mean_one_bucket":
        continue
    print(f"| {r['link']} | {r['variant']} | {r['exchange']} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
          f"{r['vs_horovod']:.2f} | {r['bytes_sent_per_rank_per_step'] / 1e6:.1f} | "
          f"{r['bytes_received_per_rank_per_step'] / 1e6:.1f} | {r['model_bytes_per_rank_per_step'] / 1e6:.1f} |")
PY
echo "results: $out" >&2
