"""pgjob's liveness for the trials a worker process runs: one thread, one statement a beat.

Optuna's own heartbeat (asked for with `heartbeat_interval`) starts a thread and commits a
row for every trial, and every worker checks for stale trials before each trial. pgjob's is
cheaper and is always on: a single thread per process writes, for every trial the process
runs, one row in `pgjob_heartbeats` (its worker, its batch job, its grace period, the time)
in one statement, within about a second of a trial starting and then every interval. The
pgjob server judges only trials with such a row (see trials.py); a client that never ran
pgjob's storage has none, so the server never fails its trials.

The thread holds its storage only weakly and ends once the storage is gone. A trial that
is no longer RUNNING in the database (finished, failed, or deleted with its study by
someone else) simply drops out of the next beat, so one process's trials never stand in
each other's way.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref

from . import schedulers
from .errors import first_line

log = logging.getLogger("pgjob.heartbeat")

GATHER = 1.0  # seconds to wait after a new trial, so that one write covers several

# No foreign key to trials: deleting a study must never make another trial's beat fail.
TABLE = """
create table if not exists pgjob_heartbeats (
    trial_id integer primary key,
    worker text not null,
    job text not null,
    grace integer not null,
    beat timestamptz not null default now())
"""

# A lost heartbeat is harmless (a restarted server refreshes them all), so it need not
# wait for the WAL flush (an rdb home's pgjob_beat says synchronous_commit = off; a
# journal home's is one durable statement, with no transaction held across round trips).
# On an rdb home only trials still RUNNING are written; the ones returned are the trials
# this process still runs. A journal home keeps trial states in the workers' memory: its
# storage writes all and answers from there (optuna_journal.py).
BEAT = """
with beat as (
    insert into pgjob_heartbeats as h (trial_id, worker, job, grace, beat)
    select t.trial_id, %(worker)s, %(job)s, %(grace)s, now() from trials t
    where t.trial_id = any(%(ids)s) and t.state = 'RUNNING'
    on conflict (trial_id) do update
        set beat = excluded.beat, worker = excluded.worker, job = excluded.job,
            grace = excluded.grace
    returning h.trial_id)
select trial_id from beat
"""
BEAT_ALL = """
insert into pgjob_heartbeats as h (trial_id, worker, job, grace, beat)
select i, %(worker)s, %(job)s, %(grace)s, now() from unnest(%(ids)s::integer[]) as i
on conflict (trial_id) do update
    set beat = excluded.beat, worker = excluded.worker, job = excluded.job,
        grace = excluded.grace
"""


def this_job() -> str:
    """The batch job this process runs in, as 'slurm:1234@0' (the server asks the
    scheduler about it), or '' outside any job. After '@' is the run of the job, where
    the scheduler tells it: a job requeued under the same id is run 1, 2, ..., and a
    trial taken in an earlier run has lost its worker even while the job runs again."""
    name = schedulers.detect()
    if name == "none":
        return ""
    found = schedulers.get(name)
    run = found.run_number(os.environ)
    return f"{name}:{found.job_id(os.environ)}" + (f"@{run}" if run is not None else "")


def this_worker() -> str:
    return f"{socket.gethostname().split('.')[0]}:{os.getpid()}"


class Heartbeats:
    def __init__(self, storage, interval: float, grace: float, enabled: bool = True) -> None:
        self._storage = weakref.ref(storage)
        self.enabled = enabled
        self.interval = interval
        self.params = {"worker": this_worker(), "job": this_job(), "grace": int(grace)}
        self.running: set[int] = set()
        self.lock = threading.Lock()
        self.new_trial = threading.Event()
        self.thread: threading.Thread | None = None
        self.failing = False

    def started(self, trial_id: int) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.running.add(trial_id)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="pgjob-heartbeat",
                                               daemon=True)
                self.thread.start()
        self.new_trial.set()

    def finished(self, trial_id: int) -> None:
        with self.lock:
            self.running.discard(trial_id)

    def beating(self) -> set[int]:
        with self.lock:
            return set(self.running)

    def _run(self) -> None:
        while True:
            if self.new_trial.wait(self.interval):
                self.new_trial.clear()
                time.sleep(GATHER)
            storage = self._storage()
            if storage is None:
                return  # the storage is gone: so is every trial it could report on
            ids = sorted(self.beating())
            if ids:
                self._beat(storage, ids)
            del storage

    def _beat(self, storage, ids: list[int]) -> None:
        try:
            alive = storage.pgjob_beat({**self.params, "ids": ids})
        except Exception as exc:  # the next beat tries again, through a new connection
            if not self.failing:
                self.failing = True
                log.warning("could not write the heartbeat of %d running trial(s): %s; "
                            "retrying every %.0f s. If this lasts longer than the grace "
                            "period, the server fails those trials (check `pgjob status`)",
                            len(ids), first_line(getattr(exc, "orig", None) or exc),
                            self.interval)
            return
        if self.failing:
            self.failing = False
            log.info("heartbeats are written again")
        with self.lock:
            self.running -= set(ids) - alive
