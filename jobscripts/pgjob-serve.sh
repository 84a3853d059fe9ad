#!/bin/bash
# The pgjob server as a Slurm batch job.
#
#   sbatch jobscripts/pgjob-serve.sh [HOME]      (or: pgjob submit [sbatch options])
#
# HOME is the instance home made by `pgjob init`: the first argument, else $PGJOB_HOME
# (sbatch passes your environment to the job), else ~/.pgjob/default.
# Options given to sbatch on the command line override the defaults below.
#
#SBATCH --job-name=pgjob-serve
# How long the server may run. Workers keep waiting for it when it ends; submit it again
# (or use a longer time) to carry on with the same study.
#SBATCH --time=24:00:00
# PostgreSQL itself needs little CPU: the workers' own code is what costs.
#SBATCH --cpus-per-task=2
# shared_buffers becomes about a quarter of this.
#SBATCH --mem=4G
# Slurm sends SIGTERM 120 s before the time limit; pgjob then withdraws the endpoint and
# shuts PostgreSQL down cleanly instead of being killed mid-write. (A SIGTERM this close
# to the limit, or SIGUSR1, keeps the renewal chain below going; scancel ends it.)
#SBATCH --signal=B:TERM@120
# The job's log, in the folder you submitted from (pgjob submit puts it in HOME/logs).
#SBATCH --output=pgjob-serve-%j.out
set -euo pipefail

home=${1:-${PGJOB_HOME:-$HOME/.pgjob/default}}
pgjob=${PGJOB:-pgjob}
# Renewal: this job queues its successor (same script, same resources, any node), which
# takes over when this one ends, so a study outlives any time limit. `pgjob stop` or
# scancel end the chain. PGJOB_RENEW=0 serves once only.
renew=--renew
[ "${PGJOB_RENEW:-1}" = 0 ] && renew=--no-renew

if ! command -v "$pgjob" >/dev/null 2>&1; then
    echo "pgjob-serve.sh: '$pgjob' is not on PATH in this job. Activate the environment" \
         "where pgjob is installed before sbatch (its PATH is passed on), or set" \
         "PGJOB=/path/to/bin/pgjob." >&2
    exit 4
fi

echo "pgjob-serve.sh: job ${SLURM_JOB_ID:-?} on ${SLURMD_NODENAME:-$(hostname)}, home $home"
# exec: the batch shell becomes pgjob serve, so Slurm's signals reach it directly (a shell
# waiting on a foreground command would not run its traps until the command ended).
exec "$pgjob" serve --home "$home" "$renew"
