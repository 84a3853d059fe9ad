"""One benchmark worker process: `worker.py BACKEND TARGET STUDY SAMPLER TRIALS [N_JOBS]`.

It sets up its storage, says "ready", waits for "go" on stdin (so that every worker starts
together and no import is timed), runs its trials with a cheap objective, and prints one
JSON line: each trial's latency (from the previous trial's end to its own end), the
time it ran and the CPU time it used. When the parent sends "hold" instead of "go", it waits after its trials for
"exit", keeping the storage open, so that idle connections can be counted.

BACKEND: pgjob (TARGET = home, an rdb or a journal home), plain (TARGET = SQLAlchemy
URL), sqlite (TARGET = file), journal (TARGET = file), inmemory (a private study, the
ceiling; TARGET is "-", or a number of finished trials the study starts with, the same
as prefill.py writes into a journal home's study).
"""
from __future__ import annotations

import json
import sys
import time

import optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_for(backend: str, target: str):
    if backend == "pgjob":
        import pgjob
        return pgjob.optuna_storage(target)
    if backend == "plain":
        return optuna.storages.RDBStorage(target)
    if backend == "sqlite":
        return optuna.storages.RDBStorage(f"sqlite:///{target}")
    if backend == "journal":
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(target))
    if backend == "inmemory":
        return optuna.storages.InMemoryStorage()
    raise SystemExit(f"unknown backend {backend}")


def sampler_for(name: str):
    if name == "random":
        return optuna.samplers.RandomSampler()
    return optuna.samplers.TPESampler(n_startup_trials=10)


def objective(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", -10, 10) ** 2 + trial.suggest_float("y", -10, 10) ** 2


def main() -> None:
    backend, target, study_name, sampler, trials = sys.argv[1:6]
    n_jobs = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    study = optuna.create_study(storage=storage_for(backend, target), study_name=study_name,
                                load_if_exists=True, sampler=sampler_for(sampler))
    if backend == "inmemory" and target.isdigit():
        import prefill
        study.add_trials(prefill.frozen_trials(int(target)))
    print("ready", flush=True)
    command = sys.stdin.readline().strip()
    ends: list[float] = []
    cpu = time.process_time()
    start = time.perf_counter()
    study.optimize(objective, n_trials=int(trials), n_jobs=n_jobs,
                   callbacks=[lambda _s, _t: ends.append(time.perf_counter())])
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    ends.sort()
    latencies = [b - a for a, b in zip([start] + ends[:-1], ends)] if n_jobs == 1 else []
    print(json.dumps({"elapsed": elapsed, "cpu": cpu, "latencies": latencies}), flush=True)
    if command == "hold":
        sys.stdin.readline()


if __name__ == "__main__":
    main()
