#!/usr/bin/env bash
# Submit an evaluation grid to SLURM: one array task per cell not done yet, then a job
# that writes the report (table, heatmap) once every task has ended.
#   slurm/submit-eval.sh GRID [fa-hvd-eval arguments, e.g. --out DIR]
# sbatch options come from the #SBATCH lines of slurm/eval.sbatch and from SBATCH_*
# variables, e.g. SBATCH_PARTITION=cpu SBATCH_ACCOUNT=my_project slurm/submit-eval.sh GRID
# Logs: fa_hvd_eval-<array id>_<task>.out and slurm-<report job id>.out here (or SBATCH_OUTPUT).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh
[ $# -ge 1 ] || die "usage: $0 GRID [fa-hvd-eval arguments]"
grid="$1"
shift
[ -f "$grid" ] || die "grid not found: $grid"
export PATH="$PWD/.venv/bin:$PATH"

# The cells to run: --list prints "N cells", then "INDEX KEY" per cell, "(done)" after finished ones.
# With --rerun-other-machines "done" means done on the listing machine, and this login node is not the
# compute nodes' machine: then every listed cell is submitted, and each task skips a cell that its
# own node's machine has already computed ("already done" in its log, a second or two).
every_cell=0
for arg in "$@"; do
  case "$arg" in
    --rer*)  # the flag, or an abbreviation of it that fa-hvd-eval's argparse accepts
      every_cell=1
      say "--rerun-other-machines: this node cannot tell which cells the compute nodes' machine has computed:" \
        "every cell is submitted (or every cell --match selects), and each task skips a cell its own machine has done";;
  esac
done
todo="$(fa-hvd-eval --grid "$grid" --list "$@" | awk -v every="$every_cell" 'NR > 1 && (every || !/\(done\)$/) { print $1 }')"
[ -n "$todo" ] || { say "every cell of $grid is done: nothing to submit"; exit 0; }
# SLURM refuses array indices >= MaxArraySize: one array per block of that many cells.
block="$(scontrol show config | awk '$1 == "MaxArraySize" { print $3 }')"
arrays=()
for offset in $(printf '%s\n' "$todo" | awk -v b="$block" '{ print int($1 / b) * b }' | sort -nu); do
  indices="$(printf '%s\n' "$todo" | awk -v b="$block" -v o="$offset" 'int($1 / b) * b == o { print $1 - o }' | paste -sd, -)"
  arrays+=("$(run sbatch --parsable --array="$indices" --export="ALL,FA_HVD_CELL_OFFSET=$offset" \
    slurm/eval.sbatch "$grid" "$@")")
done
report="$(printf '%q ' fa-hvd-eval --grid "$grid" --report "$@")"
dependency="afterany$(printf ':%s' "${arrays[@]}")"
run sbatch --parsable --job-name=fa_hvd_eval_report --dependency="$dependency" --wrap="$report"
