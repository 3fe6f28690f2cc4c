#!/usr/bin/env bash
# A single-node SLURM cluster with accounting on this machine, for tests and for trying sweeps.
#
#   slurm/cluster.sh start    install (apt-get) if needed, configure, start munge, MariaDB,
#                             slurmdbd, slurmctld and slurmd; waits until the node is idle
#   slurm/cluster.sh stop     stop every daemon it started, by the PIDs in their pid files
#   slurm/cluster.sh status   which daemons run, sinfo, core binding and the requeue wait; exit 0
#                             only when all run
#
# Jobs are bound to their allocated cores (TaskPlugin=task/affinity) where the machine allows
# it, and a requeued job may start again after $BENCH_SLURM_REQUEUE_WAIT seconds (default 10; a
# real cluster's default is 120, the credential lifetime AuthInfo=cred_expire).
#
# Needs root. State, logs and pid files live in $BENCH_SLURM_DIR (default /var/lib/iwm-bench-slurm).
# slurm.conf and slurmdbd.conf go to /etc/slurm (where sbatch and submitit look), but an existing
# file this script did not write is never replaced. Accounting (slurmdbd + MariaDB) is what makes
# sacct, and so submitit's job states, work.
set -euo pipefail

STATE=${BENCH_SLURM_DIR:-/var/lib/iwm-bench-slurm}
CLUSTER=${BENCH_SLURM_CLUSTER:-iwmbench}
MARK="# written by iwm-bench slurm/cluster.sh"
RUN=$STATE/run
LOG=$STATE/log
SLURM_CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MUNGE_PID=/run/munge/munged.pid
REQUEUE_WAIT=${BENCH_SLURM_REQUEUE_WAIT:-10}

die() { echo "cluster.sh: $*" >&2; exit 2; }

alive() {  # alive PIDFILE: the process named in the pid file runs
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
  local seconds=$1 what=$2
  shift 2
  for ((i = 0; i < seconds * 2; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  die "$what did not come up within ${seconds}s (logs in $LOG)"
}

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd slurmdbd munged mysqld_safe; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  ((${#missing[@]} == 0)) && return 0
  echo "installing slurm-wlm munge slurmdbd mariadb-server (missing: ${missing[*]})"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null
}

write_conf() {  # write_conf PATH OWNER MODE < content; refuses to replace a foreign file
  local path=$1 owner=$2 mode=$3 tmp
  if [[ -e $path ]] && ! grep -qxF "$MARK" "$path"; then
    die "$path exists and was not written by this script; move it away to use the local cluster"
  fi
  tmp=$(mktemp "$path.XXXXXX")
  { echo "$MARK"; cat; } >"$tmp"
  chown "$owner" "$tmp"
  chmod "$mode" "$tmp"
  mv "$tmp" "$path"
}

start_munge() {
  alive $MUNGE_PID && return 0
  mkdir -p /run/munge /var/log/munge
  chown munge:munge /run/munge /var/log/munge
  runuser -u munge -- munged
  wait_for 20 munge bash -c 'munge -n | unmunge'
}

start_mariadb() {
  if ! alive "$STATE/mysql/mysqld.pid"; then
    mkdir -p /run/mysqld "$STATE/mysql"
    chown mysql:mysql /run/mysqld "$STATE/mysql"
    # mysqld_safe stays in the foreground as mysqld's guardian: detach it from this shell.
    setsid mysqld_safe --user=mysql --bind-address=127.0.0.1 --pid-file="$STATE/mysql/mysqld.pid" \
      --log-error="$STATE/mysql/mysqld.log" </dev/null >/dev/null 2>&1 &
    wait_for 60 MariaDB mysqladmin ping
  fi
  if [[ ! -s $STATE/dbpass ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$STATE/dbpass")
  fi
  local pass
  pass=$(cat "$STATE/dbpass")
  mariadb -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
}

node_line() {
  # slurmd -C describes this machine; leave some memory to the system and name the real host.
  local line mem
  line=$(slurmd -C | head -n 1)
  mem=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$line")
  line=$(sed -E "s/^NodeName=[^ ]+/NodeName=$(hostname)/; s/RealMemory=[0-9]+/RealMemory=$((mem * 9 / 10))/" <<<"$line")
  echo "$line NodeAddr=127.0.0.1 State=UNKNOWN"
}

# Core binding, as real clusters do: each job step pinned to the cores it was allocated, where
# this machine lets a process set CPU affinity (some containers do not).
task_plugin() {
  if taskset -c 0 true 2>/dev/null; then echo task/affinity; else echo task/none; fi
}

write_confs() {
  # sacctmgr and the daemons all read slurm.conf: both files exist before anything starts.
  write_conf $DBD_CONF slurm:slurm 600 <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$(cat "$STATE/dbpass")
StorageLoc=slurm_acct_db
EOF
  write_conf $SLURM_CONF slurm:slurm 644 <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=$(task_plugin)
MpiDefault=none
# A requeued job waits cred_expire seconds before it may start again (default 120 s); on one
# local node nothing needs that long.
AuthInfo=cred_expire=$REQUEUE_WAIT
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
ReturnToService=2
$(node_line)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_slurmdbd() {
  if ! alive "$RUN/slurmdbd.pid"; then
    slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
  fi
  if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER" format=cluster) ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurm() {
  alive "$RUN/slurmctld.pid" || slurmctld
  alive "$RUN/slurmd.pid" || slurmd
  wait_for 60 "the node" bash -c "sinfo -h -N -o %T | grep -Eq '^(idle|mixed|allocated)'"
}

start() {
  [[ $EUID -eq 0 ]] || die "start needs root (it installs packages and runs daemons)"
  install_packages
  mkdir -p "$RUN" "$LOG" "$STATE/ctld" "$STATE/d"
  chown slurm:slurm "$STATE" "$RUN" "$LOG" "$STATE/ctld" "$STATE/d"
  chmod 755 "$STATE"
  start_munge
  start_mariadb
  write_confs
  start_slurmdbd
  start_slurm
  sinfo
}

stop_pid() {  # stop_pid NAME PIDFILE: TERM the process, wait for it to go
  local name=$1 file=$2 pid
  alive "$file" || return 0
  pid=$(cat "$file")
  kill "$pid"
  for ((i = 0; i < 60; i++)); do
    kill -0 "$pid" 2>/dev/null || { echo "stopped $name ($pid)"; return 0; }
    sleep 0.5
  done
  echo "cluster.sh: $name ($pid) still runs after 30s" >&2
  return 1
}

stop() {
  local ok=0
  stop_pid slurmd "$RUN/slurmd.pid" || ok=1
  stop_pid slurmctld "$RUN/slurmctld.pid" || ok=1
  stop_pid slurmdbd "$RUN/slurmdbd.pid" || ok=1
  # mysqld's own pid file: mysqld_safe exits by itself once mysqld ends normally.
  stop_pid mysqld "$STATE/mysql/mysqld.pid" || ok=1
  stop_pid munged $MUNGE_PID || ok=1
  return $ok
}

status() {
  local ok=0
  for entry in "munged:$MUNGE_PID" "mysqld:$STATE/mysql/mysqld.pid" "slurmdbd:$RUN/slurmdbd.pid" \
    "slurmctld:$RUN/slurmctld.pid" "slurmd:$RUN/slurmd.pid"; do
    if alive "${entry#*:}"; then
      echo "${entry%%:*}: running (pid $(cat "${entry#*:}"))"
    else
      echo "${entry%%:*}: stopped"
      ok=3
    fi
  done
  if ((ok == 0)); then
    sinfo
    local plugin
    plugin=$(scontrol show config | sed -nE 's/^TaskPlugin +=[ ]*//p')
    case $plugin in
      *affinity*) echo "core binding: on ($plugin): each job step runs on the cores it was allocated" ;;
      *) echo "core binding: off ($plugin): jobs share every core; size thread pools with threads=" ;;
    esac
    echo "requeue wait: $(scontrol show config | sed -nE 's/^AuthInfo +=[ ]*//p')"
  fi
  return $ok
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: slurm/cluster.sh start|stop|status" ;;
esac
