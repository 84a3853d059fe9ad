# Shared by up.sh and down.sh: the cluster's fixed names and process helpers.
# shellcheck shell=bash disable=SC2034

BRIDGE=pgjbr0
NODES=(node1 node2 node3)
RUN_DIR=/run/pgjob-testcluster
SPOOL_DIR=/var/spool/pgjob-testcluster
ENV_FILE=$RUN_DIR/env
CTLD_PID=$RUN_DIR/slurmctld.pid
MUNGE_PID=/run/munge/munged.pid

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
unset SLURM_CONF SLURM_CLUSTERS 2>/dev/null || true

node_veth() { echo "pgjv${1#node}"; }

# true if pid $1 exists and is not a zombie (daemons' exited intermediate
# forks can linger as zombies until PID 1 reaps them)
alive() {
    local st
    st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# live (non-zombie) pids with exactly this process name, optionally of user $2
pids_named() {
    local p
    for p in $(pgrep -x ${2:+-u "$2"} "$1" || true); do
        if alive "$p"; then echo "$p"; fi
    done
}

# pid from pid file $1, printed only if that process is alive and named $2
live_pid() {
    local f=$1 name=$2 pid
    [ -r "$f" ] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [ -n "$pid" ] && alive "$pid" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
    echo "$pid"
}

# TERM the given pids, wait up to $1 seconds, then KILL what is left
stop_pids() {
    local wait_s=$1; shift
    local pids=("$@") p i any
    [ ${#pids[@]} -gt 0 ] || return 0
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < wait_s * 10; i++)); do
        any=0
        for p in "${pids[@]}"; do if alive "$p"; then any=1; fi; done
        [ $any -eq 0 ] && return 0
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        any=0
        for p in "${pids[@]}"; do if alive "$p"; then any=1; fi; done
        [ $any -eq 0 ] && return 0
        sleep 0.1
    done
}
