#!/usr/bin/env bash
# A one-node SLURM cluster on this Debian machine, for the launcher's integration test and for
# trying `prunebench -m hydra/launcher=slurm` locally. Needs root.
#   scripts/slurm_cluster.sh install   # apt packages (slurmctld, slurmd, munge, slurmdbd, mariadb)
#   scripts/slurm_cluster.sh start     # munged, mariadb, slurmdbd (accounting), slurmctld, slurmd
#   scripts/slurm_cluster.sh stop      # stops exactly the daemons `start` started (by their PIDs)
# Accounting (slurmdbd) is not optional: without it a job killed without a result is never
# reported as ended, and submitit waits on it forever.
set -euo pipefail

STATE=${PRUNEBENCH_SLURM_STATE:-/tmp/prunebench-slurm}
NODE=$(hostname -s)

install() {
  [ "$(id -u)" = 0 ] || { echo "slurm_cluster: needs root" >&2; exit 3; }
  command -v apt-get >/dev/null || { echo "slurm_cluster: needs apt-get" >&2; exit 3; }
  if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge slurmdbd \
      mariadb-server >/dev/null
  fi
}

write_config() {
  mkdir -p "$STATE/ctld" "$STATE/spool" /etc/slurm /run/mysqld /run/munge
  chown mysql:mysql /run/mysqld
  chown munge:munge /run/munge
  local mem
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  local cpus
  cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=prunebench
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$((mem * 9 / 10)) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=prunebench_slurm_acct
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/slurmdbd.log
EOF
  chmod 600 /etc/slurm/slurmdbd.conf
}

wait_for() {  # wait_for <seconds> <command...>
  local t=$1; shift
  for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "slurm_cluster: timed out waiting for: $*" >&2
  return 1
}

start() {
  [ "$(id -u)" = 0 ] || { echo "slurm_cluster: needs root" >&2; exit 3; }
  stop >/dev/null 2>&1 || true
  if pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null; then
    echo "slurm_cluster: SLURM or munge is already running here (not ours to restart)" >&2
    exit 4
  fi
  rm -f "$STATE"/*.pid
  write_config
  # munge: the authentication every daemon and client uses
  [ -s /etc/munge/munge.key ] || (mungekey --create 2>/dev/null || create-munge-key -f)
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  # (the daemons that drop root write their PID files where their own user may)
  runuser -u munge -- munged --pid-file=/run/munge/prunebench-munged.pid
  wait_for 10 test -s /run/munge/prunebench-munged.pid
  cp /run/munge/prunebench-munged.pid "$STATE/munged.pid"
  # accounting database
  mariadbd --user=mysql --pid-file=/run/mysqld/prunebench-mariadb.pid --socket=/run/mysqld/mysqld.sock \
    --skip-networking > "$STATE/mariadb.log" 2>&1 &
  wait_for 30 mariadb-admin --socket=/run/mysqld/mysqld.sock ping
  cp /run/mysqld/prunebench-mariadb.pid "$STATE/mariadb.pid"
  slurmdbd
  wait_for 30 sacctmgr -n list cluster
  sacctmgr -i add cluster prunebench >/dev/null 2>&1 || true
  slurmctld
  wait_for 30 scontrol ping
  slurmd
  wait_for 30 sh -c "sinfo -h -o %t | grep -q idle"
  echo "slurm_cluster: up ($NODE, state in $STATE)"
}

stop() {
  for daemon in slurmd slurmctld slurmdbd mariadb munged; do
    local pidfile="$STATE/$daemon.pid"
    if [ -s "$pidfile" ]; then
      local pid
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$pidfile"
    fi
  done
  echo "slurm_cluster: stopped"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
