#!/usr/bin/env bash
# Print the hosts an elastic job may use now, one "host:slots" per line (Horovod's
# --host-discovery-script; it runs this every few seconds). The first that applies:
#   FA_HVD_HOSTS_FILE  a file of "host:slots" lines ('#' comments): edit it while the job
#                      runs to add or remove hosts;
#   SLURM_JOB_NODELIST the nodes of the SLURM job, SLURM_NTASKS_PER_NODE slots each;
#   otherwise          localhost with FA_HVD_SLOTS slots (default: the number of CPUs).
# Hosts listed in FA_HVD_EXCLUDE_FILE (one a line, e.g. RUN_DIR/excluded_hosts, which
# fa-hvd-train's robust.evict writes) are left out.
set -euo pipefail
exclude() {
  if [ -n "${FA_HVD_EXCLUDE_FILE:-}" ] && [ -s "$FA_HVD_EXCLUDE_FILE" ]; then
    awk 'NR == FNR { if (NF) drop[$1] = 1; next } { host = $0; sub(/:.*/, "", host); if (!(host in drop)) print }' \
      "$FA_HVD_EXCLUDE_FILE" -
  else
    cat
  fi
}
{
if [ -n "${FA_HVD_HOSTS_FILE:-}" ]; then
  grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$FA_HVD_HOSTS_FILE"
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/:${SLURM_NTASKS_PER_NODE:-1}/"
else
  echo "localhost:${FA_HVD_SLOTS:-$(nproc)}"
fi
} | exclude
