"""A new worker process on a journal home: `joiner.py join|grow HOME STUDY`.

join: the time a worker that joins the study needs before it can run a trial, from
`pgjob.optuna_storage()` (which loads the home's snapshot, if one is in place, and reads
the logs after it) through `create_study(load_if_exists=True)` to the first `study.ask()`
returning; the imports are timed apart. It then tells that trial and prints one JSON line.

grow: runs cheap trials (RandomSampler) until this process has saved a snapshot of the
journal, as any worker does once Optuna offers one (every 100th trial) and pgjob's
throttle lets it through (journal.SNAPSHOT_MIN_LOGS); prints the trials it took and the
slowest ask, the one that saved it.
"""
from __future__ import annotations

import json
import sys
import time

began = time.perf_counter()
import optuna  # noqa: E402

import pgjob  # noqa: E402

imported = time.perf_counter()
optuna.logging.set_verbosity(optuna.logging.WARNING)
MAX_GROW = 300


def join(home: str, study_name: str) -> dict:
    start = time.perf_counter()
    storage = pgjob.optuna_storage(home)
    opened = time.perf_counter()
    study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True)
    loaded = time.perf_counter()
    trial = study.ask()
    asked = time.perf_counter()
    study.tell(trial, 0.0)
    return {"imports_s": imported - began, "storage_s": opened - start,
            "study_s": loaded - opened, "ask_s": asked - loaded, "ready_s": asked - start,
            "snapshot_loaded": storage.pgjob_backend._snapshot_upto > 0}


def grow(home: str, study_name: str) -> dict:
    storage = pgjob.optuna_storage(home)
    study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler())
    backend = storage.pgjob_backend
    before, slowest = backend._snapshot_upto, 0.0
    for count in range(1, MAX_GROW + 1):
        start = time.perf_counter()
        trial = study.ask()
        slowest = max(slowest, time.perf_counter() - start)
        study.tell(trial, trial.suggest_float("x", -10, 10) ** 2
                   + trial.suggest_float("y", -10, 10) ** 2)
        if backend._snapshot_upto != before:
            return {"trials": count, "slowest_ask_s": slowest, "upto": backend._snapshot_upto}
    raise SystemExit(f"no snapshot saved after {MAX_GROW} trials")


if __name__ == "__main__":
    mode, home, study_name = sys.argv[1:4]
    print(json.dumps((join if mode == "join" else grow)(home, study_name)), flush=True)
