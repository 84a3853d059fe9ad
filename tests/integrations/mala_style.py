"""A worker as a framework that builds its own storage writes it (MALA's HyperOptOptuna
does this): a plain RDBStorage from a URL string, with Optuna's own heartbeat, and a study
run until enough trials are complete or running.

    python mala_style.py URL STUDY TOTAL SLEEP         (a worker)
    python mala_style.py URL STUDY --requeue-zombies   (the clean-up step, after all jobs)
"""
import sys
import time

import optuna
from optuna.trial import TrialState


def storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url=url, heartbeat_interval=2, grace_period=6)


def work(url: str, name: str, total: int, sleep: float) -> None:
    study = optuna.create_study(storage=storage(url), study_name=name, direction="minimize",
                                load_if_exists=True)

    def enough(study: optuna.Study, trial) -> None:
        # with a heartbeat, RUNNING trials count as ones that will finish
        if len(study.get_trials(states=(TrialState.COMPLETE, TrialState.RUNNING))) >= total:
            study.stop()

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -5.0, 5.0)
        time.sleep(sleep)
        return (x - 1.0) ** 2

    study.optimize(objective, n_trials=None, callbacks=[enough])


def requeue_zombies(url: str, name: str) -> None:
    """Every RUNNING trial back to WAITING: only once no worker of the study runs."""
    study = optuna.load_study(study_name=name, storage=url)
    zombies = [t for t in study.get_trials() if t.state == TrialState.RUNNING]
    for trial in zombies:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
    print("requeued", [t.number for t in zombies])


if __name__ == "__main__":
    if sys.argv[3] == "--requeue-zombies":
        requeue_zombies(sys.argv[1], sys.argv[2])
    else:
        work(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
