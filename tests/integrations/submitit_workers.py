"""Optuna workers as submitit jobs on Slurm, each with pgjob.optuna_storage().

    python submitit_workers.py FOLDER STUDY TOTAL SLEEP WORKERS

submits WORKERS jobs with submitit's AutoExecutor, writes their job ids to FOLDER/jobs.json,
then waits for their results (the number of trials each saw at its end) and prints them.
The worker is Checkpointable: on preemption or timeout submitit requeues its job and the
same call starts again; the study as a whole stops at TOTAL complete trials.
"""
import json
import sys
import time
from pathlib import Path

import optuna
import submitit
from optuna.trial import TrialState

import pgjob


class Worker(submitit.helpers.Checkpointable):
    def __call__(self, study_name: str, total: int, sleep: float) -> int:
        study = optuna.create_study(storage=pgjob.optuna_storage(), study_name=study_name,
                                    direction="minimize", load_if_exists=True)

        def objective(trial: optuna.Trial) -> float:
            x = trial.suggest_float("x", -5.0, 5.0)
            time.sleep(sleep)  # stands in for training
            return (x - 1.0) ** 2

        stop = optuna.study.MaxTrialsCallback(total, states=(TrialState.COMPLETE,))
        study.optimize(objective, callbacks=[stop])
        return len(study.trials)


def main() -> None:
    folder, study, total, sleep, workers = sys.argv[1:6]
    executor = submitit.AutoExecutor(folder=Path(folder) / "%j", slurm_max_num_timeout=3)
    executor.update_parameters(timeout_min=10, slurm_partition="debug", mem_gb=1,
                               cpus_per_task=1)
    jobs = [executor.submit(Worker(), study, int(total), float(sleep))
            for _ in range(int(workers))]
    (Path(folder) / "jobs.json").write_text(json.dumps([job.job_id for job in jobs]))
    # job.result() would poll sacct at growing intervals (up to a minute apart): the
    # result files say it sooner
    while not all(job.paths.result_pickle.exists() for job in jobs):
        time.sleep(0.5)
    print(json.dumps([job.result() for job in jobs]), flush=True)


if __name__ == "__main__":
    main()
