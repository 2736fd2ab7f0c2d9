#!/usr/bin/env bash
# Train on this machine: NP ranks under horovodrun.
#   launch/local.sh NP CONFIG [fa-hvd-train arguments, e.g. --set optim.lr=0.05]
# Horovod uses MPI when it was built with it, else Gloo; add --gloo/--mpi through
# HOROVODRUN_ARGS (e.g. HOROVODRUN_ARGS=--gloo launch/local.sh 4 configs/demo.yaml).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
[ $# -ge 2 ] || die "usage: $0 NP CONFIG [fa-hvd-train arguments]"
np="$1" config="$2"
shift 2
count NP "$np"
need horovodrun
[ -f "$config" ] || die "config not found: $config"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one torch thread per rank
# shellcheck disable=SC2086  # HOROVODRUN_ARGS is a list of options
run horovodrun -np "$np" -H "localhost:$np" ${HOROVODRUN_ARGS:-} fa-hvd-train --config "$config" "$@"
