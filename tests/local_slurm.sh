#!/usr/bin/env bash
# Start a single-machine SLURM (slurmctld + slurmd + munge, loopback only) for tests/test_slurm.py, or to try
# stages/slurm/*.sbatch on one machine. Installs Debian's slurm packages when missing (needs root and apt-get).
#
#   tests/local_slurm.sh DIR     prints `export SLURM_CONF=DIR/slurm.conf` once the node accepts jobs
#   tests/local_slurm.sh --stop DIR
#
# Nothing outside DIR is configured: the daemons and every client read DIR/slurm.conf through SLURM_CONF, so a
# machine's own /etc/slurm is left alone. Exit codes: 0 ready, 3 cannot run here (the reason on stderr), 1 failed.
set -euo pipefail

if [ "${1:-}" = "--stop" ]; then
    dir=$(realpath "$2")
    for pidfile in "$dir"/slurmd.pid "$dir"/slurmctld.pid "$dir"/munge/munged.pid; do
        [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    exit 0
fi

dir=$(realpath -m "${1:?usage: tests/local_slurm.sh DIR}")
cannot() { echo "local SLURM: $*" >&2; exit 3; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || cannot "slurmctld/slurmd/munged are not installed and installing them needs root"
    command -v apt-get >/dev/null || cannot "slurmctld/slurmd/munged are not installed and apt-get is not available"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q && apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge; } \
        > "${TMPDIR:-/tmp}/mellow-slurm-apt.log" 2>&1 \
        || cannot "apt-get install slurmctld slurmd slurm-client munge failed (see ${TMPDIR:-/tmp}/mellow-slurm-apt.log)"
fi
[ "$(id -u)" = 0 ] || cannot "starting slurmd needs root (it runs jobs as their submitting user)"

mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
chmod 700 "$dir/munge"
host=$(hostname -s)
cat > "$dir/slurm.conf" <<EOF
ClusterName=mellow-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# cred_expire: how long a requeued job waits before it may start again (120 s by default)
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${MELLOW_SLURMCTLD_PORT:-6817}
SlurmdPort=${MELLOW_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf

# munge: a key of this folder's own (not /etc/munge's), a socket the conf above names
if [ ! -f "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
fi
if [ ! -S "$dir/munge/munge.socket" ] || ! munge -n -S "$dir/munge/munge.socket" >/dev/null 2>&1; then
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/seed" \
        || cannot "munged did not start (see $dir/munge/munged.log)"
fi

if ! scontrol ping 2>/dev/null | grep -q UP; then
    slurmctld -f "$SLURM_CONF" || cannot "slurmctld did not start (see $dir/slurmctld.log)"
    slurmd -f "$SLURM_CONF" || cannot "slurmd did not start (see $dir/slurmd.log)"
fi
for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
cannot "the node did not become idle in 60 s: $(sinfo -h -N -o '%N %t %E' 2>&1 | head -3)"
