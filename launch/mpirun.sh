#!/usr/bin/env bash
# Train under Open MPI's mpirun with the flags Horovod documents.
#   launch/mpirun.sh NP CONFIG [fa-hvd-train arguments]
# Several machines: HOSTFILE=hosts launch/mpirun.sh 8 configs/x.yaml (lines "host slots=N").
# -bind-to none -map-by slot: no core pinning (torch and Horovod start their own threads);
# -x: export the environment the ranks need (every FA_HVD_* and HOROVOD_* variable set here, as
# horovodrun and srun pass theirs: mpirun passes only what -x names); -mca pml ob1 -mca btl ^openib: plain TCP/shared
# memory transports, as Horovod's docs recommend (drop them to let MPI use InfiniBand/UCX).
# As root, add --allow-run-as-root (or set OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
[ $# -ge 2 ] || die "usage: $0 NP CONFIG [fa-hvd-train arguments]"
np="$1" config="$2"
shift 2
count NP "$np"
need mpirun
[ -f "$config" ] || die "config not found: $config"
hosts=(-H "localhost:$np")  # this machine, or every machine of HOSTFILE
[ -z "${HOSTFILE:-}" ] || hosts=(-hostfile "$HOSTFILE")
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ours=()
while IFS= read -r name; do ours+=(-x "$name"); done < <(compgen -e | grep -E '^(FA_HVD|HOROVOD)_' || true)
run mpirun -np "$np" "${hosts[@]}" -bind-to none -map-by slot \
  -x NCCL_DEBUG="${NCCL_DEBUG:-WARN}" -x LD_LIBRARY_PATH -x PATH -x OMP_NUM_THREADS -x PYTHONUNBUFFERED=1 "${ours[@]}" \
  -mca pml ob1 -mca btl ^openib \
  fa-hvd-train --config "$config" "$@"
