#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to run the pipeline's DAG as real sbatch jobs
# (profiles/slurm-local, tests/test_slurm_cluster.py; docs/cluster.md tells the whole story).
#
#   sudo scripts/slurm_local.sh start    # install (Debian/Ubuntu) if missing, configure, start, wait for the node
#   sudo scripts/slurm_local.sh status   # daemons and sinfo
#   sudo scripts/slurm_local.sh stop     # stop slurmd, slurmctld, munged (running jobs are killed)
#
# FOR A THROWAWAY MACHINE OR CONTAINER ONLY: it runs as root, installs slurmctld, slurmd, slurm-client and
# munge with apt-get, and OVERWRITES /etc/slurm/slurm.conf (where Debian's SLURM reads it). Never run it on
# a machine that is part of a real cluster. Every subcommand is idempotent: `start` on a running cluster
# only rewrites the config and restarts the daemons when the config changed; `stop` on a stopped one does
# nothing.
#
# What is configured, and why:
# - one node, NodeName = `hostname -s`, its CPUs/sockets/cores from `slurmd -C`, RealMemory = total memory
#   (free -m) less 1 GiB for the OS and the daemons;
# - partitions `cpu` (default) and `gpu`, both on that node. The node has no GRES, so a job asking for a
#   GPU (--gpus=1, --gres=gpu:1) is refused at submission ("Invalid generic resource (gres)
#   specification"); profiles/slurm-local sends every rule to `cpu`.
# - no slurmdbd and no database: the executor plugin (snakemake-executor-plugin-slurm 2.x) needs sacct only
#   for job states (and a failed job's reason, its efficiency report), and asks squeue instead when told
#   (`slurm-status-command: squeue`, set in profiles/slurm-local; squeue sees finished jobs for MinJobAge
#   seconds, 300 here). With AccountingStorageType=accounting_storage/none sacct answers
#   "Slurm accounting storage is disabled" and fails.
# - no cgroups (a container has none to delegate): ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
#   JobAcctGatherType=jobacct_gather/none. Memory requests are scheduled but not enforced.
# - SelectType=select/cons_tres with CR_Core_Memory: cores and memory are consumable, so two 1-CPU jobs
#   run side by side.
# - EnforcePartLimits=ALL: a job asking for more CPUs than the node has is refused by sbatch ("More
#   processors requested than permitted") instead of pending forever (reason PartitionConfig) while
#   Snakemake waits without a word.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/lib/slurm
LOGS=/var/log/slurm
RUN=/run/slurm
MUNGE_RUN=/run/munge
NODE=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge)
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run me as root (sudo $0 $1): I install packages and write $CONF"; }

alive() {  # alive PIDFILE: the pid in it runs
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    local missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM and munge yourself"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]} failed"
}

write_config() {  # prints "changed" when the config file was (re)written
    local hw mem real
    hw=$(slurmd -C | awk '/^NodeName=/' | grep -o 'CPUs=.* ThreadsPerCore=[0-9]*' | sed 's/Boards=[0-9]* //; s/SocketsPerBoard=/Sockets=/')
    mem=$(free -m | awk '/^Mem:/ {print $2}')
    real=$(( mem > 2048 ? mem - 1024 : mem ))
    mkdir -p "$CONF_DIR"
    local new
    new=$(mktemp)
    cat >"$new" <<EOF
# Written by scripts/slurm_local.sh: a one-node cluster on $NODE for testing. Overwritten by every start.
ClusterName=cpal-local
SlurmctldHost=$NODE
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# containers: no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: sacct does not work, the executor plugin queries squeue (profiles/slurm-local)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# finished jobs stay visible to squeue for 5 minutes (the plugin needs >= 120 s to trust squeue)
MinJobAge=300
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# a job asking for more CPUs or memory than the node has is refused at submission instead of pending forever
EnforcePartLimits=ALL
SlurmdTimeout=60
NodeName=$NODE $hw RealMemory=$real State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
# no GRES on this node: jobs asking for a GPU are refused; the partition exists so profiles can name it
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    if [ -f "$CONF" ] && cmp -s "$new" "$CONF"; then
        rm -f "$new"
    else
        install -m 644 "$new" "$CONF"
        rm -f "$new"
        echo changed
    fi
}

start_munge() {
    if [ -S "$MUNGE_RUN/munge.socket.2" ] && munge -n </dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chown munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge
    chmod 755 "$MUNGE_RUN"
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 20); do
        munge -n </dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.5
    done
    die "munged does not answer (see /var/log/munge/munged.log)"
}

start_slurm() {
    mkdir -p "$RUN" "$LOGS" "$STATE/slurmctld" "$STATE/slurmd"
    chown slurm:slurm "$RUN" "$LOGS" "$STATE/slurmctld"
    if ! alive "$RUN/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld || die "slurmctld did not start (see $LOGS/slurmctld.log)"
    fi
    if ! alive "$RUN/slurmd.pid"; then
        log "starting slurmd"
        slurmd || die "slurmd did not start (see $LOGS/slurmd.log)"
    fi
}

node_state() { sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -1; }

wait_idle() {
    local state="" i
    for i in $(seq "$WAIT_S"); do
        state=$(node_state)
        case "$state" in
            idle|mix|alloc) log "node $NODE is $state"; return ;;
            drain*|down*)
                # a node drained or down from an earlier run (e.g. a stopped slurmd): bring it back
                [ $((i % 5)) = 1 ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1
    done
    sinfo -N -l >&2 || true
    die "node $NODE is '${state:-unknown}' after ${WAIT_S}s (see $LOGS/slurmctld.log, $LOGS/slurmd.log)"
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    alive "$2" || return 0
    local pid
    pid=$(cat "$2")
    log "stopping $1 ($pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
}

munged_pidfile() {
    for f in "$MUNGE_RUN/munged.pid" /var/run/munge/munged.pid; do
        [ -s "$f" ] && { echo "$f"; return; }
    done
    echo "$MUNGE_RUN/munged.pid"
}

stop_all() {
    stop_pidfile slurmd "$RUN/slurmd.pid"
    stop_pidfile slurmctld "$RUN/slurmctld.pid"
    stop_pidfile munged "$(munged_pidfile)"
}

case "${1:-}" in
    start)
        need_root start
        install_packages
        changed=$(write_config)
        if [ "$changed" = changed ] && { alive "$RUN/slurmctld.pid" || alive "$RUN/slurmd.pid"; }; then
            log "$CONF changed: restarting the SLURM daemons"
            stop_pidfile slurmd "$RUN/slurmd.pid"
            stop_pidfile slurmctld "$RUN/slurmctld.pid"
        fi
        start_munge
        start_slurm
        wait_idle
        sinfo
        ;;
    stop)
        need_root stop
        stop_all
        ;;
    status)
        for d in munged slurmctld slurmd; do
            case $d in
                munged) f=$(munged_pidfile) ;;
                *) f=$RUN/$d.pid ;;
            esac
            if alive "$f"; then echo "$d: running ($(cat "$f"))"; else echo "$d: stopped"; fi
        done
        if command -v sinfo >/dev/null && timeout 5 sinfo >/dev/null 2>&1; then
            sinfo
            exit 0
        fi
        echo "sinfo: no answer from a SLURM controller"
        exit 3
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
