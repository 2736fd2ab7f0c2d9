#!/usr/bin/env bash
# A private single-node SLURM cluster on this machine, for testing slurm/ scripts.
#
#   tools/slurm/cluster.sh up   [DIR]   install what is missing, start munged, slurmctld, slurmd
#   tools/slurm/cluster.sh down [DIR]   stop them (by their pid files) and remove DIR
#   tools/slurm/cluster.sh env  [DIR]   print the exports that point sbatch/squeue at it
#
# DIR (default /tmp/fa_hvd-slurm) holds everything: slurm.conf, the munge key and socket,
# state, spool, logs and pid files. `up` wipes DIR first, so each cluster starts clean.
# Needs root (the daemons run as root, munged as user munge) and, when SLURM is not
# installed, apt-get: Debian's slurmctld slurmd slurm-client munge (22.05 on bookworm).
# The cluster: one node (this machine, by its short host name) with FA_HVD_SLURM_CPUS CPUs (default 8, more than the
# machine may have: SlurmdParameters=config_overrides), one partition "debug" that is
# NOT the default (jobs name it: sbatch -p debug, or SBATCH_PARTITION=debug as `env`
# prints), free TCP ports chosen at start, cred_expire=10 so a requeued job restarts
# within seconds, no accounting, no cgroups (proctrack/linuxproc, task/none).
set -euo pipefail

say() { printf '[slurm-cluster] %s\n' "$*"; }
die() { printf '[slurm-cluster] ERROR: %s\n' "$*" >&2; exit 1; }
run() { printf '[slurm-cluster] +'; printf ' %q' "$@"; printf '\n'; "$@"; }

action="${1:-}"
DIR="${2:-${FA_HVD_SLURM_DIR:-/tmp/fa_hvd-slurm}}"
CPUS="${FA_HVD_SLURM_CPUS:-8}"
NODE="$(hostname -s)"  # the node is this machine, under its own name (horovodrun resolves it)
PARTITION=debug
CONF="$DIR/slurm.conf"

# The pid files the daemons write, in the order `down` stops them.
PIDFILES=("$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munge/munged.pid")

install_missing() {
  local tools=(slurmctld slurmd sbatch munged mungekey)
  local tool missing=()
  for tool in "${tools[@]}"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install SLURM"
  say "installing SLURM and munge with apt-get (missing: ${missing[*]})"
  run apt-get update -qq
  DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_conf() {
  local ctld_port slurmd_port
  ctld_port="$(free_port)"
  slurmd_port="$(free_port)"
  cat >"$CONF" <<EOF
# Written by tools/slurm/cluster.sh: a private single-node test cluster.
ClusterName=fahvd
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
MinJobAge=600
# scancel and preemption: SIGTERM, then SIGKILL KillWait s later; the ranks checkpoint in between. SLURM's
# default (30); 10 cut the batch script off before its last line on a loaded 2-core machine.
KillWait=30
MessageTimeout=60
SchedulerParameters=sched_interval=5
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4096 State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  local m="$DIR/munge"
  mkdir -p "$m"
  chown munge:munge "$m"
  chmod 0711 "$m"
  run runuser -u munge -- mungekey --create --keyfile="$m/munge.key"
  run runuser -u munge -- munged --socket="$m/munge.socket" --key-file="$m/munge.key" \
    --pid-file="$m/munged.pid" --log-file="$m/munged.log" --seed-file="$m/munged.seed"
}

wait_for_node() {
  local state=""
  for _ in $(seq 1 120); do
    state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)"
    [ "$state" = idle ] && return 0
    sleep 0.5
  done
  tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  die "node $NODE is '${state:-unknown}' after 60 s, not idle (logs above, in $DIR/log)"
}

# DIR is removed by `up` and `down`: only when it is empty or one of ours.
check_dir_is_ours() {
  [ ! -e "$DIR" ] || [ -z "$(ls -A "$DIR")" ] || grep -qs '^# Written by tools/slurm/cluster.sh' "$CONF" \
    || die "$DIR exists and is not a cluster made by this script: choose another DIR"
}

up() {
  [ "$(id -u)" -eq 0 ] || die "needs root: the daemons run as root and munged as user munge"
  check_dir_is_ours
  install_missing
  down_quietly
  rm -rf "$DIR"
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  write_conf
  export SLURM_CONF="$CONF"
  start_munge
  run slurmctld -f "$CONF" -c
  run slurmd -f "$CONF" -N "$NODE"
  wait_for_node
  say "up: node $NODE ($CPUS CPUs), partition $PARTITION; to use it:"
  print_env
}

print_env() {
  printf 'export SLURM_CONF=%q SBATCH_PARTITION=%s SALLOC_PARTITION=%s SLURM_PARTITION=%s\n' \
    "$CONF" "$PARTITION" "$PARTITION" "$PARTITION"
}

stop_pidfile() {
  local file="$1" pid
  [ -f "$file" ] || return 0
  pid="$(cat "$file")"
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping pid $pid ($(basename "$file" .pid))"
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}

down_quietly() {
  local file
  for file in "${PIDFILES[@]}"; do stop_pidfile "$file"; done
}

case "$action" in
  up) up ;;
  down) check_dir_is_ours; down_quietly; rm -rf "$DIR"; say "down: $DIR removed" ;;
  env) print_env ;;
  *) die "usage: $0 up|down|env [DIR]" ;;
esac
