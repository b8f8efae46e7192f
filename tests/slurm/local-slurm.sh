#!/usr/bin/env bash
# A real, single-node Slurm cluster for tests: munged, slurmctld and slurmd (Debian's slurm-wlm
# 22.05 packages), all state, sockets and logs under one folder, on ports of its own, so it needs
# nothing from /etc and leaves nothing behind.
#
#   local-slurm.sh start DIR [PORT_BASE]   prints `export SLURM_CONF=DIR/slurm.conf` once the node
#                                          is idle; exit 77 (with the reason) when Slurm or munge
#                                          is not installed
#   local-slurm.sh stop DIR                stops the three daemons and any job left in the queue
#
# The node declares more CPUs than the machine has (SlurmdParameters=config_overrides) so that a
# 5-task job fits on a 2-core CI machine, as `mpirun --oversubscribe` does.
set -euo pipefail

usage() {
  echo "usage: $0 start DIR [PORT_BASE] | stop DIR" >&2
  exit 2
}
[ $# -ge 2 ] || usage
action="$1"
dir="$(mkdir -p "$2" && cd "$2" && pwd)"
port_base="${3:-16817}"

stop() {
  export SLURM_CONF="$dir/slurm.conf"
  if [ -f "$SLURM_CONF" ] && command -v scancel >/dev/null; then
    timeout 10 scancel --full --signal=KILL --user=root 2>/dev/null || true
  fi
  for pidfile in "$dir"/slurmd.pid "$dir"/slurmctld.pid; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  if [ -S "$dir/munge.socket" ]; then
    munged --stop --socket="$dir/munge.socket" >/dev/null 2>&1 || true
  fi
}

case "$action" in
  stop)
    stop
    exit 0
    ;;
  start) ;;
  *) usage ;;
esac

for tool in munged slurmctld slurmd sbatch srun scontrol sinfo; do
  if ! command -v "$tool" >/dev/null; then
    echo "local-slurm: $tool not found (install Slurm and munge: bash deploy/install-deps.sh --tests)" >&2
    exit 77
  fi
done
if [ "$(id -u)" -ne 0 ]; then
  echo "local-slurm: needs root (slurmd starts jobs as their owner)" >&2
  exit 77
fi

# Slurm's state from an earlier run in DIR would bring back its jobs.
stop
rm -rf "$dir/state" "$dir/spool"
mkdir -p "$dir/state" "$dir/spool"

# munge: a fresh key, its own socket. munged refuses keys others can read.
head -c 1024 /dev/urandom >"$dir/munge.key"
chmod 400 "$dir/munge.key"
munged --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" --log-file="$dir/munged.log" \
  --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed"

node="$(hostname -s)"
cat >"$dir/slurm.conf" <<EOF
ClusterName=nibbletest
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge.socket
CredType=cred/munge
SlurmctldPort=$port_base
SlurmdPort=$((port_base + 1))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName=$node CPUs=8 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
export SLURM_CONF="$dir/slurm.conf"

slurmctld -f "$SLURM_CONF" -i
slurmd -f "$SLURM_CONF" -N "$node"

for _ in $(seq 100); do
  state="$(sinfo -h -n "$node" -o %T 2>/dev/null || true)"
  if [ "$state" = "idle" ]; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.2
done
echo "local-slurm: node $node did not become idle (state '${state:-none}'); logs in $dir" >&2
tail -n 5 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
stop
exit 1
