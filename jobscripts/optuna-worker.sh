#!/bin/bash
# Optuna workers as a Slurm array job: each task waits for the pgjob server, then runs
# TRIALS trials of your objective script in study STUDY.
#
#   sbatch jobscripts/optuna-worker.sh [OBJECTIVE_SCRIPT]
#   STUDY=lr-search TRIALS=50 sbatch --array=1-20%10 jobscripts/optuna-worker.sh train.py
#
# OBJECTIVE_SCRIPT (default jobscripts/example_objective.py, relative to the folder you
# submit from) is run as: python OBJECTIVE_SCRIPT --study STUDY --trials TRIALS, followed
# by any further arguments given after OBJECTIVE_SCRIPT.
# Workers may be submitted before the server: they wait up to PGJOB_WAIT seconds for it.
#
# 10 tasks, at most 5 at once; each one is one worker process.
#SBATCH --job-name=optuna-worker
#SBATCH --array=1-10%5
#SBATCH --time=04:00:00
#SBATCH --cpus-per-task=1
#SBATCH --mem=2G
#SBATCH --output=optuna-worker-%A_%a.out
set -euo pipefail

objective=${1:-jobscripts/example_objective.py}
export PGJOB_HOME=${PGJOB_HOME:-$HOME/.pgjob/default}
study=${STUDY:-pgjob-study}
trials=${TRIALS:-20}
python=${PYTHON:-python3}
pgjob=${PGJOB:-pgjob}

echo "optuna-worker.sh: task ${SLURM_ARRAY_TASK_ID:-1} of job ${SLURM_JOB_ID:-?} on" \
     "${SLURMD_NODENAME:-$(hostname)}: waiting for the server of $PGJOB_HOME"
# Wait here, not in Python, so the job log says plainly when the server was found. The
# libpq form is the server's address, which every home has (a journal home has no URL
# for plain Optuna; the objective reaches it through pgjob.optuna_storage()).
"$pgjob" url --format libpq --wait "${PGJOB_WAIT:-3600}" >/dev/null
echo "optuna-worker.sh: server found; running $trials trials of $objective in study $study"
exec "$python" "$objective" --study "$study" --trials "$trials" "${@:2}"
