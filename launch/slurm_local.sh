#!/usr/bin/env bash
# launch/slurm_local.sh start|stop|status DIR
#
# A real single-node SLURM (Debian 12: slurm-wlm 22.05 + munge) on loopback, for tests and
# for trying launch/spjax.sbatch on one machine. Root, no systemd, no cgroups. Everything
# except munged (system-wide) lives under DIR; clients find the cluster through
#     export SLURM_CONF=DIR/slurm.conf
# `start` installs the packages with apt-get when they are missing. Recipe and the reason
# for every config line: shared/notes/slurm-single-node.md (verified on this machine kind).
#
# Environment: SLURM_LOCAL_CPUS (default 8; may exceed the real cores, see config_overrides),
# SLURM_LOCAL_CTLD_PORT / SLURM_LOCAL_SLURMD_PORT (default 16817 / 16818: off the system
# SLURM's 6817/6818, so both can coexist; give free ports to run two clusters at once).
set -euo pipefail
cmd=${1:-}; dir=${2:-}
if [[ ! $cmd =~ ^(start|stop|status)$ || -z $dir ]]; then
  echo "usage: $0 start|stop|status DIR" >&2; exit 2
fi
D=$(mkdir -p "$dir" && cd "$dir" && pwd)
export SLURM_CONF="$D/slurm.conf"
CPUS=${SLURM_LOCAL_CPUS:-8}
CTLD_PORT=${SLURM_LOCAL_CTLD_PORT:-16817}
SLURMD_PORT=${SLURM_LOCAL_SLURMD_PORT:-16818}

if [ "$cmd" = status ]; then
  # `scontrol ping` answers at once; sinfo/sbatch against a dead controller retry for ~9 s.
  exec scontrol ping
fi

if [ "$cmd" = stop ]; then
  if [ -s "$SLURM_CONF" ]; then
    squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
  fi
  for daemon in slurmd slurmctld; do
    if [ -s "$D/$daemon.pid" ]; then
      pid=$(cat "$D/$daemon.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  # munged is shared by the whole machine: stop it only if this DIR's `start` started it,
  # and no other cluster (another DIR, started since and relying on it) still runs.
  if [ -s "$D/munged.started" ]; then
    if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
      echo "$0: leaving munged running: another SLURM on this machine uses it" >&2
    else
      kill "$(cat "$D/munged.started")" 2>/dev/null || true
    fi
    rm -f "$D/munged.started"
  fi
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "$0: must run as root (SlurmUser=root, munged started by hand)" >&2; exit 1
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v srun >/dev/null; then
  echo "$0: installing slurmctld slurmd slurm-client munge (apt-get)" >&2
  apt-get update -qq
  # The `slurm-wlm` metapackage would pull 43 packages; these 8 are enough.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi

# munge: the package's postinst creates the key; /run/munge is not created (and vanishes
# on reboot), and without systemd nothing starts munged.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile /etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if ! munge -n >/dev/null 2>&1; then
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  cat /run/munge/munged.pid > "$D/munged.started"
fi

mkdir -p "$D/state" "$D/spool" "$D/log"
cat > "$SLURM_CONF" <<CONF
# Written by launch/slurm_local.sh: single node on loopback, no cgroups, root.
ClusterName=spjaxlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# Requeue (launch/spjax.sbatch requeues itself after saving on the time limit warning): a
# requeued job may start again cred_expire + 1 s after the requeue (default 120 + 1; 5 is the
# least allowed, and credentials are checked within milliseconds on loopback); the main
# scheduler then tests pending jobs every sched_interval s (default 60). JobRequeue=1 (the
# default) lets batch jobs be requeued; spjax.sbatch asks --requeue too, for clusters at 0.
AuthInfo=cred_expire=5
SchedulerParameters=batch_sched_delay=0,sched_interval=1
JobRequeue=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=60
MailProg=/bin/true
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmdSpoolDir=$D/spool
StateSaveLocation=$D/state
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -c -f "$SLURM_CONF"          # -c: no saved state (jobs, node states) from a last run
slurmd -f "$SLURM_CONF" -N localhost   # -N: node name independent of the hostname
for _ in $(seq 100); do
  if [ "$(sinfo -h -o %T 2>/dev/null)" = idle ]; then
    echo "slurm up: export SLURM_CONF=$SLURM_CONF"; exit 0
  fi
  sleep 0.1
done
echo "$0: slurm did not come up; see $D/log" >&2
exit 1
