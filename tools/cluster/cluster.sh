#!/usr/bin/env bash
# A private multi-node cluster on this machine: each node a Linux network namespace.
#
#   tools/cluster/cluster.sh up [N]            nodes node1..nodeN (default 2), each with sshd
#   tools/cluster/cluster.sh down              stop what `up` started (by pid), remove it all
#   tools/cluster/cluster.sh exec NODE CMD...  run CMD on NODE (its network, hosts file, ssh)
#   tools/cluster/cluster.sh link NODE [delay MS] [loss PCT] [rate RATE]   fault NODE's link
#   tools/cluster/cluster.sh link NODE clear   remove it
#   tools/cluster/cluster.sh partition NODE    take NODE's link down (a cut cable)
#   tools/cluster/cluster.sh heal NODE         bring it back up
#   tools/cluster/cluster.sh crash NODE        kill every process on NODE at once (sshd too)
#   tools/cluster/cluster.sh restart NODE      start NODE's sshd (and slurmd) again
#   tools/cluster/cluster.sh slurm-up          munged, slurmctld on node1, one slurmd per node
#   tools/cluster/cluster.sh slurm-down        stop them
#   tools/cluster/cluster.sh nodes             the node names, one a line
#
# Layout: a namespace PREFIX-sw holds the bridge (the switch); node i is the namespace
# PREFIX-nodei with one veth, eth0, at 10.213.0.(10+i)/24 (FA_HVD_CLUSTER_NET, a /24 used
# by nothing else). Nothing is added to this machine's own network namespace. What runs on a
# node sees /etc/netns/NS/* bound over /etc: a private /etc/hosts (every node by name),
# /etc/ssh (a client config with the cluster's own key and known hosts, and sshd's) and
# /etc/slurm; and its own UTS namespace, so `hostname` says the node's name. The file system is shared, as NFS would share it.
# State (keys, pid files, logs, slurm spool) lives in DIR (FA_HVD_CLUSTER_DIR, default
# /tmp/fa_hvd-cluster). `up` first takes down whatever a previous (perhaps crashed) run
# left, so it can be rerun at any time. Needs root, iproute2 and tc; installs openssh-server
# (and, for slurm-up, Debian's SLURM 22.05 and munge) with apt-get when missing.
set -euo pipefail

say() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

PREFIX="${FA_HVD_CLUSTER_PREFIX:-fahvd}"
DIR="${FA_HVD_CLUSTER_DIR:-/tmp/fa_hvd-cluster}"
NET="${FA_HVD_CLUSTER_NET:-10.213.0}"
SW="$PREFIX-sw"
MARK="# Written by tools/cluster/cluster.sh"
LOCAL="/var/lib/$PREFIX-node"  # on every node, its own DIR/NODE/local: node-local disk

ns() { echo "$PREFIX-$1"; }                          # node name -> namespace
addr() { echo "$NET.$((10 + ${1#node}))"; }          # node name -> address
nodes() { if [ -f "$DIR/nodes" ]; then cat "$DIR/nodes"; fi; }
known() { grep -qx "$1" "$DIR/nodes" 2>/dev/null || die "no node '$1' in this cluster (nodes: $(nodes | paste -sd' '))"; }

# on NODE CMD...: CMD in NODE's network namespace, with NODE's files from /etc/netns/NS bound
# over /etc (as `ip netns exec` binds them, but keeping this machine's /sys and its cgroups,
# which slurmd needs), DIR/NODE/local over LOCAL, and NODE as its host name.
on() {
  local node="$1"
  shift
  # shellcheck disable=SC2016  # expanded by the inner sh
  nsenter --net="/run/netns/$(ns "$node")" unshare --mount --uts -- sh -c '
    for f in "$1"/*; do [ -e "/etc/${f##*/}" ] && mount --bind "$f" "/etc/${f##*/}"; done
    mount --bind "$2" "$3" && hostname "$0" && shift 3 && exec "$@"' \
    "$node" "/etc/netns/$(ns "$node")" "$DIR/$node/local" "$LOCAL" "$@"
}

install_missing() {  # install_missing TOOL... -- PACKAGE...
  local tools=() missing=()
  while [ "$1" != -- ]; do tools+=("$1"); shift; done
  shift
  for t in "${tools[@]}"; do command -v "$t" >/dev/null || [ -x "/usr/sbin/$t" ] || missing+=("$t"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install $*"
  say "installing $* with apt-get (missing: ${missing[*]})"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

stop_pidfile() {  # stop the process named in FILE, if it is still running
  local file="$1" pid
  [ -f "$file" ] || return 0
  pid="$(cat "$file" 2>/dev/null || true)"
  rm -f "$file"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

# Processes still inside a node's namespace (ranks, ssh sessions): stopped with it.
kill_in_ns() {
  local pids
  pids="$(ip netns pids "$1" 2>/dev/null || true)"
  [ -z "$pids" ] && return 0
  # shellcheck disable=SC2086  # one pid per word
  kill -9 $pids 2>/dev/null || true
}

down() {
  [ -d "$DIR" ] || [ -n "$(ip netns list | grep "^$PREFIX-" || true)" ] || { say "nothing to take down"; return 0; }
  [ ! -f "$DIR/nodes" ] || grep -qs "^$MARK" "$DIR/cluster.conf" || die "$DIR is not a cluster made by this script"
  slurm_down
  local n f
  for f in "$DIR"/*/sshd.pid; do [ -f "$f" ] && stop_pidfile "$f"; done
  for n in $(ip netns list | awk -v p="$PREFIX-" 'index($1, p) == 1 { print $1 }'); do
    kill_in_ns "$n"
    ip netns del "$n" 2>/dev/null || true
    rm -rf "/etc/netns/$n"
  done
  rmdir /etc/netns "$LOCAL" 2>/dev/null || true
  rm -rf "$DIR"
  say "down"
}

write_hosts() {
  local node
  {
    echo "$MARK"
    echo "127.0.0.1 localhost"
    for node in $(nodes); do echo "$(addr "$node") $node"; done
  } >"$DIR/hosts"
}

start_node() {
  local node="$1" n a etc
  n="$(ns "$node")" a="$(addr "$node")" etc="/etc/netns/$(ns "$node")"
  ip netns add "$n"
  ip -n "$SW" link add "v-$node" type veth peer name eth0 netns "$n"
  ip -n "$SW" link set "v-$node" master br0 up
  ip -n "$n" link set lo up
  ip -n "$n" addr add "$a/24" dev eth0
  ip -n "$n" link set eth0 up
  mkdir -p "$DIR/$node/local" "$etc/ssh"
  cp "$DIR/hosts" "$etc/hosts"
  echo "$node" >"$etc/hostname"
  ssh-keygen -q -t ed25519 -N '' -C "$node" -f "$DIR/$node/host_key"
  echo "$node,$a $(cut -d' ' -f1,2 "$DIR/$node/host_key.pub")" >>"$DIR/known_hosts"
  cat >"$etc/ssh/ssh_config" <<EOF
$MARK: the client config on $node.
Host *
  IdentityFile $DIR/id_ed25519
  IdentitiesOnly yes
  BatchMode yes
  StrictHostKeyChecking yes
  UserKnownHostsFile $DIR/known_hosts
  LogLevel INFO
  ConnectTimeout 5
  ServerAliveInterval 3
  ServerAliveCountMax 3
EOF
  cat >"$etc/ssh/sshd_config" <<EOF
$MARK: sshd on $node.
ListenAddress $a
HostKey $DIR/$node/host_key
PidFile $DIR/$node/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
X11Forwarding no
MaxStartups 200
MaxSessions 200
LogLevel ERROR
Subsystem sftp internal-sftp
EOF
  start_sshd "$node"
}

start_sshd() { on "$1" /usr/sbin/sshd -f /etc/ssh/sshd_config -E "$DIR/$1/sshd.log"; }

crash() {  # every process on the node at once (sshd, slurmd, ranks): a node crash
  known "$1"
  rm -f "$DIR/$1/sshd.pid" "$DIR/$1/local/slurmd.pid"
  kill_in_ns "$(ns "$1")"
  say "$1: crashed (every process in $(ns "$1") killed)"
}

# restart NODE: the node boots again with its local disk wiped (LOCAL: slurmd's spool, where
# a crashed step leaves PMIx's socket, and /tmp), then its sshd, and its slurmd if SLURM is up.
restart() {
  known "$1"
  rm -rf "$DIR/$1/local/tmp" "$DIR/$1/local/slurmd"
  mkdir "$DIR/$1/local/tmp" "$DIR/$1/local/slurmd"
  start_sshd "$1"
  [ ! -f "/etc/netns/$(ns "$1")/slurm/slurm.conf" ] || slurmd_start "$1"
  say "$1: restarted"
}

wait_for_ssh() {
  local from="$1" node="$2"
  for _ in $(seq 1 50); do
    on "$from" ssh "$node" true 2>/dev/null && return 0
    sleep 0.2
  done
  die "cannot ssh from $from to $node (log: $DIR/$node/sshd.log)"
}

up() {
  local count="${1:-2}" node
  [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, sshd)"
  [[ "$count" =~ ^[1-9][0-9]?$ ]] || die "N must be 1..99, got '$count'"
  install_missing ip tc -- iproute2
  install_missing sshd ssh -- openssh-server openssh-client
  down
  mkdir -p "$DIR" /run/sshd "$LOCAL"
  chmod 0755 /run/sshd
  echo "$MARK" >"$DIR/cluster.conf"
  for i in $(seq 1 "$count"); do echo "node$i"; done >"$DIR/nodes"
  ssh-keygen -q -t ed25519 -N '' -C "fa_hvd-cluster" -f "$DIR/id_ed25519"
  cp "$DIR/id_ed25519.pub" "$DIR/authorized_keys"
  write_hosts
  ip netns add "$SW"
  ip -n "$SW" link add br0 type bridge
  ip -n "$SW" link set br0 up
  for node in $(nodes); do start_node "$node"; done
  for node in $(nodes); do wait_for_ssh node1 "$node"; done
  say "up: $(nodes | paste -sd' ') on $NET.0/24 (state in $DIR); e.g. $0 exec node1 ssh $(nodes | tail -n 1) hostname"
}

rate_bits() {  # 100mbit, 1gbit, 10gbit, 500kbit -> bits per second
  [[ "$1" =~ ^([0-9]+)(kbit|mbit|gbit)$ ]] || die "rate must look like 100mbit, 1gbit or 10gbit, got '$1'"
  local scale=1
  case "${BASH_REMATCH[2]}" in kbit) scale=1000 ;; mbit) scale=1000000 ;; gbit) scale=1000000000 ;; esac
  echo $((BASH_REMATCH[1] * scale))
}

# Link faults, both directions (egress of the node's eth0 and of the switch port towards it):
# rate with tbf, delay with netem (when the kernel has it), loss with nftables on the node.
link() {
  local node="$1" n delay="" loss="" rate=""
  shift
  known "$node"
  n="$(ns "$node")"
  if [ "${1:-}" = clear ]; then
    ip netns exec "$n" tc qdisc del dev eth0 root 2>/dev/null || true
    ip netns exec "$SW" tc qdisc del dev "v-$node" root 2>/dev/null || true
    ! command -v nft >/dev/null || ip netns exec "$n" nft delete table inet fahvd_loss 2>/dev/null || true
    say "$node: link clear"
    return 0
  fi
  [ $# -gt 0 ] || die "usage: link NODE [delay MS] [loss PCT] [rate RATE] | clear"
  while [ $# -gt 0 ]; do
    case "$1" in
      delay) delay="${2:?delay MS}" ;;
      loss) loss="${2:?loss PCT}" ;;
      rate) rate="${2:?rate, e.g. 1gbit}"; rate_bits "$rate" >/dev/null ;;
      *) die "unknown link setting '$1' (delay MS, loss PCT, rate RATE)" ;;
    esac
    shift 2
  done
  local qdisc=()
  if [ -n "$delay" ]; then
    [[ "$delay" =~ ^[0-9]+$ ]] || die "delay is whole milliseconds, got '$delay'"
    ip netns exec "$SW" tc qdisc replace dev "v-$node" root netem delay 0ms 2>/dev/null \
      || die "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): a delay cannot be emulated here (nor with fq or etf, which would honour a BPF-set departure time: absent too; a userspace NFQUEUE relay would cap the link far below the rates measured); rate (tbf) and loss (nftables) can"
    qdisc=(netem delay "${delay}ms" limit 100000)
    [ -z "$rate" ] || qdisc+=(rate "$rate")
  elif [ -n "$rate" ]; then  # a bucket of 10 ms at the rate: short bursts pass, the mean is the rate
    qdisc=(tbf rate "$rate" burst "$(( $(rate_bits "$rate") / 800 ))" latency 100ms)
  fi
  if [ ${#qdisc[@]} -gt 0 ]; then
    ip netns exec "$n" tc qdisc replace dev eth0 root "${qdisc[@]}"
    ip netns exec "$SW" tc qdisc replace dev "v-$node" root "${qdisc[@]}"
  fi
  if [ -n "$loss" ]; then
    [[ "$loss" =~ ^[0-9]+(\.[0-9]{1,2})?$ ]] || die "loss is a percentage, e.g. 1 or 0.5, got '$loss'"
    install_missing nft -- nftables
    local per10k
    per10k="$(awk -v p="$loss" 'BEGIN { printf "%d", p * 100 }')"
    ip netns exec "$n" nft -f - <<EOF
table inet fahvd_loss
delete table inet fahvd_loss
table inet fahvd_loss {
  chain in { type filter hook input priority 0; numgen random mod 10000 < $per10k drop; }
  chain out { type filter hook output priority 0; numgen random mod 10000 < $per10k drop; }
}
EOF
  fi
  say "$node: link${delay:+ delay $delay ms}${loss:+ loss $loss %}${rate:+ rate $rate} (each way)"
}

partition() {
  known "$1"
  ip -n "$SW" link set "v-$1" "$2"
  say "$1: link $2"
}

# --- SLURM: munged (a unix socket: every namespace reaches it through the file system),
# slurmctld on node1, one slurmd per node, each reading /etc/slurm/slurm.conf (the same on all).
slurm_down() {
  local f
  for f in "$DIR"/*/local/slurmd.pid "$DIR"/slurm/slurmctld.pid "$DIR"/slurm/munge/munged.pid; do
    [ -f "$f" ] && stop_pidfile "$f"
  done
  rm -rf "$DIR/slurm"
  for f in /etc/netns/"$PREFIX"-*/slurm; do [ -d "$f" ] && rm -rf "$f"; done
  return 0
}

# slurmd's spool, its /tmp for PMIx and its pid file are node-local (LOCAL): PMIx expects the
# same paths on every node, and a shared /tmp would mix the nodes' PMIx directories.
slurm_conf() {
  local s="$DIR/slurm" n
  cat <<EOF
$MARK: SLURM on the namespace cluster.
ClusterName=fahvdnet
SlurmctldHost=node1($(addr node1))
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$s/munge/munge.socket,cred_expire=10
StateSaveLocation=$s/state
SlurmdSpoolDir=$LOCAL/slurmd
TmpFS=$LOCAL/tmp
SlurmctldPidFile=$s/slurmctld.pid
SlurmdPidFile=$LOCAL/slurmd.pid
SlurmctldLogFile=$s/log/slurmctld.log
SlurmdLogFile=$LOCAL/slurmd.log
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
SlurmdTimeout=10
MailProg=/bin/true
MinJobAge=600
KillWait=5
MessageTimeout=20
SchedulerParameters=sched_interval=2
EOF
  for n in $(nodes); do echo "NodeName=$n NodeAddr=$(addr "$n") CPUs=${FA_HVD_SLURM_CPUS:-8} RealMemory=4096 State=UNKNOWN"; done
  echo "PartitionName=debug Nodes=$(nodes | paste -sd,) Default=YES MaxTime=INFINITE State=UP"
}

slurmd_start() {
  local node="$1"
  on "$node" slurmd -f /etc/slurm/slurm.conf -N "$node"
}

slurm_up() {
  local s="$DIR/slurm" node
  [ -f "$DIR/nodes" ] || die "no cluster: run '$0 up' first"
  install_missing slurmctld slurmd sbatch munged mungekey -- slurmctld slurmd slurm-client munge
  slurm_down
  mkdir -p "$s/state" "$s/log" "$s/munge"
  chown munge:munge "$s/munge"
  chmod 0711 "$s" "$s/munge"
  runuser -u munge -- mungekey --create --keyfile="$s/munge/munge.key"
  runuser -u munge -- munged --socket="$s/munge/munge.socket" --key-file="$s/munge/munge.key" \
    --pid-file="$s/munge/munged.pid" --log-file="$s/munge/munged.log" --seed-file="$s/munge/munged.seed"
  slurm_conf >"$s/slurm.conf"
  for node in $(nodes); do
    rm -rf "$DIR/$node/local/slurmd" "$DIR/$node/local/tmp"
    mkdir -p "/etc/netns/$(ns "$node")/slurm" "$DIR/$node/local/slurmd" "$DIR/$node/local/tmp"
    cp "$s/slurm.conf" "/etc/netns/$(ns "$node")/slurm/slurm.conf"
  done
  on node1 slurmctld -f /etc/slurm/slurm.conf -c
  for node in $(nodes); do slurmd_start "$node"; done
  local idle=""
  for _ in $(seq 1 120); do
    idle="$(on node1 sinfo -h -t idle -o %D 2>/dev/null || true)"
    [ "${idle:-0}" -eq "$(nodes | wc -l)" ] && break
    sleep 0.5
  done
  [ "${idle:-0}" -eq "$(nodes | wc -l)" ] \
    || { tail -n 20 "$s"/log/*.log "$DIR"/*/local/slurmd.log >&2; die "not every node is idle after 60 s (logs above)"; }
  say "slurm up: partition debug, nodes $(nodes | paste -sd,); submit on a node: $0 exec node1 sbatch ..."
}

action="${1:-}"
[ $# -eq 0 ] || shift
case "$action" in
  up) up "$@" ;;
  down) down ;;
  nodes) nodes ;;
  exec) [ $# -ge 2 ] || die "usage: exec NODE CMD..."; known "$1"; on "$@" ;;
  link) [ $# -ge 2 ] || die "usage: link NODE [delay MS] [loss PCT] [rate RATE] | clear"; link "$@" ;;
  partition) [ $# -eq 1 ] || die "usage: partition NODE"; partition "$1" down ;;
  heal) [ $# -eq 1 ] || die "usage: heal NODE"; partition "$1" up ;;
  slurm-up) slurm_up ;;
  slurm-down) slurm_down; say "slurm down" ;;
  crash) [ $# -eq 1 ] || die "usage: crash NODE"; crash "$1" ;;
  restart) [ $# -eq 1 ] || die "usage: restart NODE"; restart "$1" ;;
  *) die "usage: $0 up [N] | down | nodes | exec NODE CMD... | link NODE ... | partition NODE | heal NODE | crash NODE | restart NODE | slurm-up | slurm-down" ;;
esac
