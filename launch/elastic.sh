#!/usr/bin/env bash
# Elastic training: horovodrun keeps the run going while hosts come and go.
#   launch/elastic.sh NP MIN_NP MAX_NP CONFIG [fa-hvd-train arguments]
# Starts NP ranks; when a rank fails, the survivors restore the last commit and go on
# (its host is blacklisted), as long as at least MIN_NP ranks are left; new slots are
# used up to MAX_NP. Horovod asks launch/discover-hosts.sh for the hosts every few
# seconds (see there: a hosts file you edit, the SLURM job's nodes, or this machine).
# On one machine Horovod needs two host names (or --network-interface through
# HOROVODRUN_ARGS): FA_HVD_HOSTS_FILE with "localhost:2" and "127.0.0.1:2" works.
# robust.evict lists the hosts to drain in FA_HVD_EXCLUDE_FILE (default: RUN_DIR/excluded_hosts,
# RUN_DIR from --run-dir or fa-hvd-train's default runs/<config stem>); the discovery script
# leaves them out, so the run goes on without them.
# horovodrun runs as `python -m fa_hvd.horovodrun` (the python on PATH, where fa_hvd is
# installed): the same driver, except that telling rank 0 of a host change no longer holds up
# the survivors when rank 0's node is cut off (see fa_hvd/horovodrun.py).
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
[ $# -ge 4 ] || die "usage: $0 NP MIN_NP MAX_NP CONFIG [fa-hvd-train arguments]"
np="$1" min_np="$2" max_np="$3" config="$4"
shift 4
count NP "$np"
count MIN_NP "$min_np"
count MAX_NP "$max_np"
if [ "$min_np" -gt "$np" ] || [ "$np" -gt "$max_np" ]; then die "needs MIN_NP <= NP <= MAX_NP, got $min_np, $np, $max_np"; fi
need python
[ -f "$config" ] || die "config not found: $config"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
run_dir="runs/$(basename "${config%.*}")"
previous=""
for arg in "$@"; do
  case "$previous" in --run-dir) run_dir="$arg" ;; esac
  case "$arg" in --run-dir=*) run_dir="${arg#--run-dir=}" ;; esac
  previous="$arg"
done
[[ "$run_dir" = /* ]] || run_dir="$PWD/$run_dir"
export FA_HVD_EXCLUDE_FILE="${FA_HVD_EXCLUDE_FILE:-$run_dir/excluded_hosts}"
say "hosts robust.evict excludes: $FA_HVD_EXCLUDE_FILE"
# shellcheck disable=SC2086  # HOROVODRUN_ARGS is a list of options
run python -m fa_hvd.horovodrun -np "$np" --min-np "$min_np" --max-np "$max_np" \
  --host-discovery-script "$(cd "$(dirname "$0")" && pwd)/discover-hosts.sh" ${HOROVODRUN_ARGS:-} \
  fa-hvd-train --config "$config" --set elastic.enabled=true "$@"
