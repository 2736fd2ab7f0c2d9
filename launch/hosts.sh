#!/usr/bin/env bash
# Train on several machines under horovodrun, one rank per slot of a hostfile.
#   launch/hosts.sh HOSTFILE CONFIG [fa-hvd-train arguments]
# HOSTFILE has one line per machine, "hostname slots=N" (N ranks there, e.g. its GPUs).
# Horovod starts the remote ranks over ssh: every host must reach every other without a
# password, and see this directory (with its .venv) at the same path.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
[ $# -ge 2 ] || die "usage: $0 HOSTFILE CONFIG [fa-hvd-train arguments]"
hostfile="$1" config="$2"
shift 2
[ -f "$config" ] || die "config not found: $config"
[ -r "$hostfile" ] || die "cannot read hostfile $hostfile"
# The world size is the sum of the slots.
np="$(awk '!/^[[:space:]]*(#|$)/ { s = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) s = substr($i, 7); n += s }
           END { print n + 0 }' "$hostfile")"
[ "$np" -gt 0 ] || die "no hosts in $hostfile"
need horovodrun
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# shellcheck disable=SC2086  # HOROVODRUN_ARGS is a list of options
run horovodrun -np "$np" -hostfile "$hostfile" ${HOROVODRUN_ARGS:-} fa-hvd-train --config "$config" "$@"
