#!/usr/bin/env bash
# Run one rank with only its own GPU visible, chosen by its local rank on the node.
#   launch/pin-gpu.sh COMMAND [ARGS...]     (the launcher starts it once per rank)
# The local rank comes from the launcher: HOROVOD_LOCAL_RANK (horovodrun with Gloo),
# OMPI_COMM_WORLD_LOCAL_RANK (mpirun, horovodrun with MPI) or SLURM_LOCALID (srun).
# CUDA_VISIBLE_DEVICES (the node's GPUs, as SLURM sets it for a job with GPUs) shrinks
# to entry <local rank>; unset or empty (no GPUs), COMMAND runs as it is.
set -euo pipefail
local_rank="${HOROVOD_LOCAL_RANK:-${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-0}}}"
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
  if [ "$local_rank" -ge "${#gpus[@]}" ]; then
    echo "pin-gpu.sh: error: local rank $local_rank but only ${#gpus[@]} GPU(s): CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >&2
    exit 2
  fi
  export CUDA_VISIBLE_DEVICES="${gpus[$local_rank]}"
  echo "[pin-gpu.sh] local rank $local_rank: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES" >&2
fi
exec "$@"
