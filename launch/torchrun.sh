#!/usr/bin/env bash
# Train under torchrun (torch.distributed: Gloo on the CPU, NCCL on GPUs; no Horovod needed).
#   launch/torchrun.sh NPROC CONFIG [fa-hvd-train arguments]
# One node: NPROC workers. Several nodes: run it on every node with NNODES (the number of
# nodes) and RDZV_ENDPOINT (host:port on one of them that every node reaches; c10d
# rendezvous), RDZV_ID naming the job (default fa_hvd). MAX_RESTARTS (default 0): torchrun
# restarts the whole group that many times after a worker fails, and the trainer resumes from
# the newest checkpoint (--resume auto, its default) bit-exactly. More torchrun options
# through TORCHRUN_ARGS.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"
[ $# -ge 2 ] || die "usage: $0 NPROC CONFIG [fa-hvd-train arguments]"
nproc="$1" config="$2"
shift 2
count NPROC "$nproc"
[ -z "${NNODES:-}" ] || count NNODES "$NNODES"
need torchrun
[ -f "$config" ] || die "config not found: $config"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one torch thread per rank
# By default torchrun's workers share its rendezvous store, and a restarted group reads the
# Gloo/NCCL addresses of the group that died (pytorch/pytorch#135712): a store of their own.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
if [ -n "${NNODES:-}" ]; then
  [ -n "${RDZV_ENDPOINT:-}" ] || die "NNODES=$NNODES needs RDZV_ENDPOINT=host:port (a node every node reaches)"
  nodes=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-fa_hvd}")
else
  nodes=(--standalone)
fi
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
run torchrun "${nodes[@]}" --nproc-per-node "$nproc" --max-restarts "${MAX_RESTARTS:-0}" ${TORCHRUN_ARGS:-} \
  --no-python fa-hvd-train --config "$config" --set robust.transport=torch "$@"
