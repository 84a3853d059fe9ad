#!/usr/bin/env bash
# Tear down the single-machine Slurm test cluster made by up.sh.
#
# Run as root. Idempotent: with nothing up it does nothing and exits 0.
# Cancels jobs (best effort), stops slurmd/slurmctld/munged, kills every
# process still living in the node namespaces (e.g. a postgres a job left
# behind), deletes namespaces, veths and bridge, and removes the env file
# and the cluster's spool state. Logs in /var/log/pgjob-testcluster stay.
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

T0=${EPOCHREALTIME/./}
log() { local t=$(( (${EPOCHREALTIME/./} - T0) / 100000 )); printf '[down.sh %3d.%ds] %s\n' $((t / 10)) $((t % 10)) "$*"; }
[ "$(id -u)" -eq 0 ] || { echo "down.sh: ERROR: must run as root" >&2; exit 1; }

# pids of all processes whose network namespace is that of /run/netns/$1
ns_pids() {
    [ -e "/run/netns/$1" ] || return 0
    ip netns pids "$1" 2>/dev/null || true
}

# ---------------------------------------------------------------- jobs
ctld_pid=$(live_pid "$CTLD_PID" slurmctld || true)
if [ -n "$ctld_pid" ] && command -v squeue >/dev/null; then
    jobs=$(timeout 10 squeue -h -o '%i' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        # give the batch scripts' TERM traps a moment (everything is killed below anyway)
        for ((i = 0; i < 30; i++)); do
            [ -z "$(timeout 5 squeue -h -o '%i' -t PD,R,CG,S 2>/dev/null || true)" ] && break
            sleep 0.1
        done
    fi
fi

# ---------------------------------------------------------------- slurm daemons
pids=()
for n in "${NODES[@]}"; do
    p=$(live_pid "$RUN_DIR/slurmd-$n.pid" slurmd || true)
    [ -z "$p" ] || pids+=("$p")
done
[ -z "$ctld_pid" ] || pids+=("$ctld_pid")
# leftovers without (valid) pid files, by exact name
for name in slurmd slurmctld; do
    for p in $(pids_named "$name"); do
        case " ${pids[*]-} " in *" $p "*) ;; *) pids+=("$p") ;; esac
    done
done
if [ ${#pids[@]} -gt 0 ]; then
    log "stopping slurm daemons: ${pids[*]}"
    stop_pids 10 "${pids[@]}"
fi

# ---------------------------------------------------------------- stray processes in the nodes
strays=()
for n in "${NODES[@]}"; do
    for p in $(ns_pids "$n"); do if [ "$p" != "$$" ] && alive "$p"; then strays+=("$p"); fi; done
done
if [ ${#strays[@]} -gt 0 ]; then
    desc=$(ps -o pid=,user=,comm= -p "$(IFS=,; echo "${strays[*]}")" 2>/dev/null | awk '{printf "%s(%s,%s) ", $1, $3, $2}')
    log "killing processes left in node namespaces: ${desc:-${strays[*]}}"
    stop_pids 5 "${strays[@]}"
fi

# ---------------------------------------------------------------- munged
p=$(live_pid "$MUNGE_PID" munged || true)
if [ -z "$p" ]; then p=$(pids_named munged munge); fi
if [ -n "$p" ]; then
    log "stopping munged: $(tr '\n' ' ' <<<"$p")"
    # shellcheck disable=SC2086
    stop_pids 5 $p
fi

# ---------------------------------------------------------------- network
for n in "${NODES[@]}"; do
    veth=$(node_veth "$n")
    if ip link show "$veth" >/dev/null 2>&1; then ip link del "$veth" || true; fi
    if [ -e "/run/netns/$n" ]; then
        log "deleting namespace $n"
        ip netns del "$n" || true
    fi
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "deleting bridge $BRIDGE"
    ip link del "$BRIDGE" || true
fi

# ---------------------------------------------------------------- files
rm -f "$ENV_FILE" "$CTLD_PID" "$RUN_DIR"/slurmd-*.pid
rm -rf "$SPOOL_DIR"
rmdir "$RUN_DIR" 2>/dev/null || true

# ---------------------------------------------------------------- check
left=$(pids_named slurmd; pids_named slurmctld; pids_named munged munge)
if [ -n "$left" ]; then
    echo "down.sh: ERROR: daemons still running: $(tr '\n' ' ' <<<"$left")" >&2
    exit 1
fi
log "cluster down"
