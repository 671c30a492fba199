#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, bound to the loopback address, to try
# `python -m common.benchmark ... --backend slurm` without a cluster. Debian/Ubuntu, as root.
#   bash benchmarks/local_slurm.sh          # install (once), configure, start; prints sinfo
#   bash benchmarks/local_slurm.sh stop     # scontrol shutdown (slurmctld + slurmd)
# Safe to run again. Accounting (sacct) is not set up: submitit then logs "Bypassing sacct error" and falls
# back to squeue, which is harmless.
set -euo pipefail

if [[ "${1:-}" == "stop" ]]; then
  scontrol shutdown
  exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "run as root (it installs packages and starts daemons)" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

node=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)   # leave 20 % to the system

# munge authenticates the daemons to each other; one key, readable by the munge user only
mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
[[ -s /etc/munge/munge.key ]] || head -c 1024 /dev/urandom > /etc/munge/munge.key
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || /usr/sbin/munged --force

mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<EOF
# one node that is also the controller, reachable on 127.0.0.1 only
ClusterName=localhost
SlurmctldHost=${node}(127.0.0.1)
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
SlurmUser=root
AuthType=auth/munge
# cores are the unit of allocation, so --cpus-per-task is honoured and tasks share the node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# no cgroups in a container: track processes by parentage, no task binding, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# a node that was down comes back by itself when its slurmd registers again
ReturnToService=2
EOF
# slurmd reads cgroup.conf even with proctrack/linuxproc; v1 with no automount loads without cgroups
printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n' > /etc/slurm/cgroup.conf

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld -i
sleep 2
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 30); do
  sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break
  sleep 1
done
sinfo
