"""Large studies made fast, for the benchmarks that need one already full of trials.

A journal home's study is written straight into its journal: the logs Optuna itself writes
for one trial (captured from a real JournalStorage: create the trial, suggest x and y,
tell the value) are copied for every trial with new numbers, values and times, and loaded
with one COPY. So the study holds what a real one of that size holds, 4 logs per trial,
made in seconds instead of the minutes 4 round trips per trial would take. An in-memory
study gets the same trials through `study.add_trials`.

Both use the same points (seeded by the trial count), x and y in [-10, 10], and the
objective of worker.py, x**2 + y**2, so TPE meets the same history in either storage.
"""
from __future__ import annotations

import datetime
import json
import random
import uuid

import optuna
import psycopg
from optuna.distributions import FloatDistribution
from optuna.storages.journal import BaseJournalBackend

from pgjob.journal import counted_fields, ensure_tables

optuna.logging.set_verbosity(optuna.logging.WARNING)
DISTRIBUTIONS = {"x": FloatDistribution(-10, 10), "y": FloatDistribution(-10, 10)}
PREFILL_WORKERS = 8  # the worker ids the prefilled logs are spread over
_EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)


def points(count: int, first: int = 0) -> list[tuple[float, float]]:
    draw = random.Random(f"{count}-{first}")
    return [(draw.uniform(-10, 10), draw.uniform(-10, 10)) for _ in range(count)]


def frozen_trials(count: int) -> list[optuna.trial.FrozenTrial]:
    """`count` finished trials, for `study.add_trials` on any storage."""
    return [optuna.trial.create_trial(params={"x": x, "y": y}, distributions=DISTRIBUTIONS,
                                      value=x * x + y * y) for x, y in points(count)]


class _Capture(BaseJournalBackend):
    """A journal backend that only keeps what Optuna appends, in a list."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def read_logs(self, log_number_from: int):
        return iter(self.logs[log_number_from:])

    def append_logs(self, logs: list[dict]) -> None:
        self.logs.extend(logs)


def _optuna_logs(study_name: str) -> tuple[dict, list[dict]]:
    """Optuna's own logs for creating the study, and for one trial of it."""
    capture = _Capture()
    study = optuna.create_study(storage=optuna.storages.JournalStorage(capture),
                                study_name=study_name)
    trial = study.ask()
    trial.suggest_float("x", -10, 10)
    trial.suggest_float("y", -10, 10)
    study.tell(trial, 0.0)
    return capture.logs[0], capture.logs[1:]


def journal_logs(study_name: str, count: int, first_trial: int = 0,
                 with_study: bool = True) -> list[dict]:
    """The logs of `count` finished trials numbered from `first_trial` (Optuna numbers a
    journal's trials in the order they were created, across its studies), after the
    study's creation when `with_study`."""
    create_study, one_trial = _optuna_logs(study_name)
    study_id = one_trial[0]["study_id"]
    logs = [create_study] if with_study else []
    for i, (x, y) in enumerate(points(count, first_trial)):
        trial_id = first_trial + i
        started = _EPOCH + datetime.timedelta(seconds=trial_id)
        for template in one_trial:
            log = {**template, "worker_id": f"prefill-{trial_id % PREFILL_WORKERS}"}
            if "trial_id" in log:
                log["trial_id"] = trial_id
            if "study_id" in log:
                log["study_id"] = study_id
            if "datetime_start" in log:
                log["datetime_start"] = started.isoformat(timespec="microseconds")
            if "datetime_complete" in log:
                log["datetime_complete"] = (started + datetime.timedelta(
                    milliseconds=500)).isoformat(timespec="microseconds")
            if "param_name" in log:
                log["param_value_internal"] = x if log["param_name"] == "x" else y
            if "values" in log:
                log["values"] = [x * x + y * y]
            logs.append(log)
    return logs


def clear_journal(conn: psycopg.Connection) -> None:
    """An empty journal (no study, no snapshot), as a new journal home has."""
    ensure_tables(conn)
    with conn.transaction():
        conn.execute("truncate pgjob_journal, pgjob_journal_snapshots")
        conn.execute("update pgjob_journal_head set next = 0")


def trials_in_journal(conn: psycopg.Connection) -> int:
    return conn.execute("select count(*) from pgjob_journal where op = 4").fetchone()[0]


def append_journal(conn: psycopg.Connection, logs: list[dict]) -> None:
    """`logs` after the journal's last one, in one transaction, holding the counter row
    as pgjob's own append does (so no worker may append meanwhile)."""
    request = uuid.uuid4()
    with conn.transaction():
        first = conn.execute("select next from pgjob_journal_head for update").fetchone()[0]
        with conn.cursor().copy("copy pgjob_journal (id, log, request, op, study, trial, "
                                "state) from stdin") as copy:
            for number, log in enumerate(logs, first):
                copy.write_row((number, json.dumps(log, separators=(",", ":")), request,
                                *counted_fields(log)))
        conn.execute("update pgjob_journal_head set next = %s", (first + len(logs),))


def fill_journal(conn: psycopg.Connection, study_name: str, count: int,
                 new: bool = True) -> None:
    """A study of `count` finished trials in the journal: a new study in an emptied
    journal when `new`, else `count` more trials of the study already there."""
    if new:
        clear_journal(conn)
        append_journal(conn, journal_logs(study_name, count))
    else:
        append_journal(conn, journal_logs(study_name, count, trials_in_journal(conn),
                                          with_study=False))
