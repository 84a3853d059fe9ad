#!/usr/bin/env bash
# Bring up a real single-machine Slurm test cluster for pgjob.
#
#   munged, slurmctld (on the host, bridge address 10.77.213.1) and three
#   slurmd (node1..node3), each in its own network namespace with its own
#   address on the bridge pgjbr0.
#
# Run as root. Idempotent: running it again reuses what is healthy and
# restarts what is not (or what a changed slurm.conf needs restarted).
# Tear down with down.sh (same directory).
#
# Writes /run/pgjob-testcluster/env (KEY=VALUE lines) for the test suite.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- settings
CLUSTER_NAME=pgjobtest
SUBNET_PREFIX=10.77.213
BRIDGE_ADDR=${SUBNET_PREFIX}.1
CTLD_PORT=6817
NODE_PORT_BASE=6820        # nodeN listens on NODE_PORT_BASE + N
NODE_CPUS=2
NODE_MEM_MB=4000
DEF_MEM_PER_CPU_MB=200
MIN_JOB_AGE=600
KILL_WAIT=10
TEST_USER=${PGJOB_TEST_USER:-pgjobtest}
WAIT_NODES_S=${PGJOB_CLUSTER_WAIT:-60}

LOG_DIR=/var/log/pgjob-testcluster
CONF_FILE=/etc/slurm/slurm.conf
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge

PKGS=(slurmctld slurmd slurm-client munge iproute2)
export DEBIAN_FRONTEND=noninteractive

T0=${EPOCHREALTIME/./}
log() { local t=$(( (${EPOCHREALTIME/./} - T0) / 100000 )); printf '[up.sh %3d.%ds] %s\n' $((t / 10)) $((t % 10)) "$*"; }
die() { echo "up.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

node_addr() { echo "${SUBNET_PREFIX}.$((10 + ${1#node}))"; }
node_port() { echo $((NODE_PORT_BASE + ${1#node})); }

show_logs() {
    local f
    echo "up.sh: FAILED: $*; log tails from $LOG_DIR follow" >&2
    for f in "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd-node*.log "$LOG_DIR"/munged.log "$LOG_DIR"/*.stderr; do
        [ -s "$f" ] || continue
        echo "===== $f =====" >&2
        # leave out the harmless start-up noise (no PMIx library installed)
        # (munged's "Unauthorized credential for client UID=0" lines are harmless too)
        grep -v -e 'pmix' -e 'MPI: Cannot create context' -e 'Unauthorized credential' "$f" | tail -n 15 >&2 || true
    done
    echo "----- sinfo -N -----" >&2
    timeout 10 sinfo -N >&2 2>&1 || true
}
fail() { show_logs "$*"; die "$*"; }

# ---------------------------------------------------------------- packages
missing=()
for p in "${PKGS[@]}"; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$st" = "install ok installed" ] || missing+=("$p")
done
mkdir -p "$LOG_DIR"
chmod 0755 "$LOG_DIR"
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    # keep package scripts from starting services on their own
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        made_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${PKGS[@]}"; } >"$LOG_DIR/apt.log" 2>&1; then
        tail -n 30 "$LOG_DIR/apt.log" >&2
        die "package installation failed (full log: $LOG_DIR/apt.log)"
    fi
    if [ $made_policy -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi
for b in slurmctld slurmd sbatch sinfo scontrol munged mungekey nsenter ip; do
    command -v "$b" >/dev/null || die "$b not found after installation"
done

# ---------------------------------------------------------------- test user
if ! id "$TEST_USER" >/dev/null 2>&1; then
    log "creating user $TEST_USER"
    useradd -m -s /bin/bash "$TEST_USER"
fi

# the env file means "cluster is up": it is written again only at the end
rm -f "$ENV_FILE"

# ---------------------------------------------------------------- network
log "network"
ipv6_off() { # best effort: keep the test links IPv4-only (no RS/DAD chatter)
    local ns=$1 f=/proc/sys/net/ipv6/conf/$2/disable_ipv6
    if [ -z "$ns" ]; then
        if [ -w "$f" ]; then echo 1 >"$f" 2>/dev/null || true; fi
    else
        nsenter --net="/run/netns/$ns" sh -c "[ -w $f ] && echo 1 > $f" 2>/dev/null || true
    fi
}
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
fi
ipv6_off "" "$BRIDGE"
ip addr replace "$BRIDGE_ADDR/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for n in "${NODES[@]}"; do
    veth=$(node_veth "$n")
    [ -e "/run/netns/$n" ] || ip netns add "$n"
    if ! ip -n "$n" link show eth0 >/dev/null 2>&1; then
        ip link del "$veth" >/dev/null 2>&1 || true   # stale half of a pair
        ip link add "$veth" type veth peer name eth0 netns "$n"
    fi
    ip link show "$veth" >/dev/null 2>&1 || die "veth $veth for $n missing (namespace $n has an eth0 not made by up.sh?)"
    ipv6_off "" "$veth"
    ipv6_off "$n" eth0
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    ip -n "$n" link set lo up
    ip -n "$n" addr replace "$(node_addr "$n")/24" dev eth0
    ip -n "$n" link set eth0 up
done

# ---------------------------------------------------------------- directories
mkdir -p "$RUN_DIR" "$SPOOL_DIR/ctld" /etc/slurm
chmod 0755 "$RUN_DIR" "$SPOOL_DIR"
for n in "${NODES[@]}"; do mkdir -p "$SPOOL_DIR/slurmd-$n"; done
# slurm creates its log files 0600; create them first so any user can read them
for f in slurmctld.log "${NODES[@]/#/slurmd-}"; do
    f=$LOG_DIR/${f%.log}.log
    touch "$f"
    chmod 0644 "$f"
done

# ---------------------------------------------------------------- slurm.conf
HOST=$(hostname)
conf_tmp=$(mktemp)
{
    cat <<EOF
# Written by pgjob tests/cluster/up.sh -- single-machine test cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$HOST($BRIDGE_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM_PER_CPU_MB
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=$KILL_WAIT
MinJobAge=$MIN_JOB_AGE
InactiveLimit=0
Waittime=0
MailProg=/bin/true
StateSaveLocation=$SPOOL_DIR/ctld
SlurmdSpoolDir=$SPOOL_DIR/slurmd-%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
    for n in "${NODES[@]}"; do
        echo "NodeName=$n NodeAddr=$(node_addr "$n") NodeHostname=$HOST Port=$(node_port "$n") CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE OverSubscribe=FORCE:16 State=UP"
} >"$conf_tmp"
conf_changed=0
if ! cmp -s "$conf_tmp" "$CONF_FILE"; then
    install -m 0644 "$conf_tmp" "$CONF_FILE"
    conf_changed=1
fi
rm -f "$conf_tmp"

# ---------------------------------------------------------------- munge
if [ ! -s "$MUNGE_KEY" ]; then
    log "creating munge key"
    mkdir -p /etc/munge
    mungekey -c -f -k "$MUNGE_KEY"
fi
chown munge:munge "$MUNGE_KEY" /etc/munge
chmod 0600 "$MUNGE_KEY"
chmod 0700 /etc/munge
mkdir -p "$MUNGE_RUN" /var/lib/munge /var/log/munge
chown munge:munge "$MUNGE_RUN" /var/lib/munge /var/log/munge
chmod 0755 "$MUNGE_RUN"
if ! live_pid "$MUNGE_PID" munged >/dev/null || ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    pid=$(live_pid "$MUNGE_PID" munged || true)
    [ -z "$pid" ] || stop_pids 5 "$pid"
    log "starting munged"
    touch "$LOG_DIR/munged.log"
    chown munge:munge "$LOG_DIR/munged.log"
    chmod 0644 "$LOG_DIR/munged.log"
    runuser -u munge -- /usr/sbin/munged --force --log-file="$LOG_DIR/munged.log" \
        --pid-file="$MUNGE_PID" </dev/null >>"$LOG_DIR/munged.stderr" 2>&1 \
        || fail "munged failed to start"
    for ((i = 0; i < 50; i++)); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    munge -n | unmunge >/dev/null || fail "munge does not work"
fi

# ---------------------------------------------------------------- slurm daemons
ctld_pid=$(live_pid "$CTLD_PID" slurmctld || true)
slurmd_pids=()
all_slurmd=1
for n in "${NODES[@]}"; do
    p=$(live_pid "$RUN_DIR/slurmd-$n.pid" slurmd || true)
    if [ -n "$p" ]; then slurmd_pids+=("$p"); else all_slurmd=0; fi
done

if [ $conf_changed -eq 0 ] && [ -n "$ctld_pid" ] && [ $all_slurmd -eq 1 ]; then
    log "slurmctld and all slurmd already running with this slurm.conf: reusing"
else
    if [ -n "$ctld_pid" ] || [ ${#slurmd_pids[@]} -gt 0 ]; then
        log "restarting slurm daemons"
        stop_pids 10 ${slurmd_pids[@]+"${slurmd_pids[@]}"} ${ctld_pid:+"$ctld_pid"}
    fi
    # leftovers without (valid) pid files: exact names only
    left=$(pids_named slurmctld; pids_named slurmd)
    # shellcheck disable=SC2086
    [ -z "$left" ] || stop_pids 10 $left

    log "starting slurmctld"
    slurmctld </dev/null >>"$LOG_DIR/slurmctld.stderr" 2>&1 \
        || fail "slurmctld failed to start"
    for ((i = 0; i < 100; i++)); do
        timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break
        sleep 0.2
    done
    timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' || fail "slurmctld does not answer (scontrol ping)"

    for n in "${NODES[@]}"; do
        log "starting slurmd $n ($(node_addr "$n"):$(node_port "$n"))"
        nsenter --net="/run/netns/$n" slurmd -N "$n" </dev/null >>"$LOG_DIR/slurmd-$n.stderr" 2>&1 \
            || fail "slurmd $n failed to start"
    done
fi

# ---------------------------------------------------------------- wait for nodes
log "waiting (up to ${WAIT_NODES_S}s) for ${NODES[*]} to be idle"
deadline=$(( $(date +%s) + WAIT_NODES_S ))
resumed=0
while :; do
    states=$(timeout 10 sinfo -N -h -o '%N %T' 2>/dev/null | sort -u || true)
    ok=0; bad=()
    for n in "${NODES[@]}"; do
        st=$(awk -v n="$n" '$1 == n {print $2}' <<<"$states")
        case "$st" in
            idle|mixed|allocated|completing) ok=$((ok + 1)) ;;
            *) bad+=("$n=${st:-?}") ;;
        esac
    done
    [ $ok -eq ${#NODES[@]} ] && break
    # a node left drained/down by an earlier run: ask once to resume it
    if [ $resumed -eq 0 ] && [ $(( deadline - $(date +%s) )) -lt $(( WAIT_NODES_S - 10 )) ]; then
        for b in "${bad[@]}"; do
            case "${b#*=}" in drain*|down) timeout 10 scontrol update NodeName="${b%%=*}" State=RESUME 2>/dev/null || true ;; esac
        done
        resumed=1
    fi
    # a daemon that died will not come back by waiting: fail fast
    if [ $(( $(date +%s) + WAIT_NODES_S - deadline )) -ge 3 ]; then
        dead=()
        live_pid "$CTLD_PID" slurmctld >/dev/null || dead+=(slurmctld)
        for n in "${NODES[@]}"; do
            live_pid "$RUN_DIR/slurmd-$n.pid" slurmd >/dev/null || dead+=("slurmd-$n")
        done
        if [ ${#dead[@]} -gt 0 ]; then
            fail "not running: ${dead[*]} (node states: ${bad[*]})"
        fi
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        fail "nodes not idle after ${WAIT_NODES_S}s: ${bad[*]}"
    fi
    sleep 0.5
done

# ---------------------------------------------------------------- env file
env_tmp=$(mktemp)
{
    echo "PGJOB_TEST_CLUSTER=1"
    echo "CLUSTER_NAME=$CLUSTER_NAME"
    echo "PARTITION=debug"
    echo "SLURM_CONF_PATH=$CONF_FILE"
    echo "CONTROLLER_HOST=$HOST"
    echo "CONTROLLER_PORT=$CTLD_PORT"
    echo "BRIDGE=$BRIDGE"
    echo "BRIDGE_ADDR=$BRIDGE_ADDR"
    echo "SUBNET=${SUBNET_PREFIX}.0/24"
    echo "NODES=$(IFS=,; echo "${NODES[*]}")"
    echo "NODE_COUNT=${#NODES[@]}"
    for n in "${NODES[@]}"; do
        N=${n#node}
        echo "NODE${N}_NAME=$n"
        echo "NODE${N}_ADDR=$(node_addr "$n")"
        echo "NODE${N}_PORT=$(node_port "$n")"
    done
    echo "NODE_CPUS=$NODE_CPUS"
    echo "NODE_MEM_MB=$NODE_MEM_MB"
    echo "MIN_JOB_AGE=$MIN_JOB_AGE"
    echo "KILL_WAIT=$KILL_WAIT"
    echo "TEST_USER=$TEST_USER"
    echo "LOG_DIR=$LOG_DIR"
    echo "SLURMCTLD_LOG=$LOG_DIR/slurmctld.log"
    for n in "${NODES[@]}"; do echo "SLURMD_LOG_${n#node}=$LOG_DIR/slurmd-$n.log"; done
} >"$env_tmp"
install -m 0644 "$env_tmp" "$ENV_FILE"
rm -f "$env_tmp"

log "cluster up: $(timeout 10 sinfo -N -h -o '%N=%T' | tr '\n' ' ')"
log "env file: $ENV_FILE"
