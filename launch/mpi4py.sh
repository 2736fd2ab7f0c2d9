#!/usr/bin/env bash
# Train with the plain-MPI transport (mpi4py) instead of Horovod's collectives, for
# machines where Horovod cannot be built; the same as mpirun.sh otherwise.
#   launch/mpi4py.sh NP CONFIG [fa-hvd-train arguments]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
[ $# -ge 2 ] || die "usage: $0 NP CONFIG [fa-hvd-train arguments]"
np="$1" config="$2"
shift 2
run "$(dirname "$0")/mpirun.sh" "$np" "$config" --set robust.transport=mpi "$@"
