#!/usr/bin/env bash
# Aggregation benchmark (fa-hvd-bench aggregators): wall-clock time of each robust
# aggregation rule on p seeded honest gradients of length n (float32, CPU; median
# of 5 timed calls after 1 warm-up, f = 3; a rule whose precondition fails is skipped).
#   1. FA, both modes, against the direct formulation of the released FA (an SVD of
#      the n x (p + p(p-1)) stacked matrix per IRLS step, timed once) at n = 1e6,
#      p = 15, lambda = 1, T = 4: speedup, fp64 relative difference, FA / Multi-Krum.
#   2. Scaling in n (1e5, 1e6, 1.1e7) at p = 15, every rule but MDA, whose subset
#      enumeration grows exponentially in p; MDA runs alone up to n = 1e6.
#   3. Scaling in p (8, 15, 32, 64) at n = 1e6.
# Writes a fresh file of JSON lines (one per rule and size, plus a summary line per
# size with FA's bar checks); each part prints a table of median times to stderr.
# About 4 minutes on 2 idle cores. Peak memory is about 13 GB, in part 1's fp64 run
# of the direct FA (the n x 225 stacked matrix, its copies and the SVD's); the rest
# stays under 3 GB (part 2's G at n = 1.1e7 is 660 MB).
# Usage: benchmarks/aggregators.sh [OUT.jsonl [EXTRA ARGS...]]  (e.g. --device cuda)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/runs/bench/aggregators.jsonl}
extra=("${@:2}")
mkdir -p "$(dirname "$out")"
: >"$out"
bench() { "$root/.venv/bin/fa-hvd-bench" aggregators "$@" "${extra[@]}" >>"$out"; }

echo "== 1. FA vs the direct FA, n = 1e6, p = 15 ==" >&2
bench --direct --n 1000000 --p 15 --rules flag,multikrum
echo "== 2. scaling in n, p = 15 ==" >&2
bench --n 100000,1000000,11000000 --p 15 \
    --rules mean,median,trimmed_mean,krum,multikrum,bulyan,geomed,cclip,nmean,flag
bench --n 100000,1000000 --p 15 --rules mda
echo "== 3. scaling in p, n = 1e6 ==" >&2
bench --n 1000000 --p 8,15,32,64 --rules flag,multikrum,krum,mean,median,geomed
echo "results: $out" >&2
