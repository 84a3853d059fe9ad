"""Server-side care of Optuna's trials: heartbeats across a restart, dead workers' trials
failed and re-queued.

The server judges only the trials whose workers declared pgjob heartbeats (a row in
`pgjob_heartbeats`, see heartbeat.py). A trial of a plain Optuna client (the `pgjob url`
string, Optuna's CLI, an integration with its own RDBStorage) has none and is left to that
client's own settings: the server never fails it. For a declared trial the worker's batch
job, when it recorded one, is the better witness than a late heartbeat: a job still running
keeps its trial, a job that has ended loses it at once.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

import psycopg

from . import scheduler
from .home import Settings
from .retries import KEEP

log = logging.getLogger("pgjob.trials")


# pgjob's heartbeats, and Optuna's (of clients that asked for them)
HEARTBEAT_COLUMNS = (("pgjob_heartbeats", "beat"), ("trial_heartbeats", "heartbeat"))


def refresh_heartbeats(conn: psycopg.Connection) -> int:
    """Give every running trial a fresh heartbeat when a server (re)starts, pgjob's and
    Optuna's alike.

    Workers could not send heartbeats while there was no server; without this, the first
    worker back (or the server's sweep) would fail every other worker's live trial.
    """
    present = conn.execute(
        "select to_regclass('public.trials') is not null, "
        "to_regclass('public.pgjob_heartbeats') is not null, "
        "to_regclass('public.trial_heartbeats') is not null").fetchone()
    refreshed = 0
    if not present[0]:
        return refreshed  # no worker yet: no trial to refresh
    for (table, column), there in zip(HEARTBEAT_COLUMNS, present[1:]):
        if there:
            refreshed += conn.execute(
                f"update {table} h set {column} = now() from trials t "
                "where t.trial_id = h.trial_id and t.state = 'RUNNING'").rowcount
    return refreshed


# Job states in which the worker's process may still run its trial (Slurm's names; pbs.py
# and lsf.py translate theirs). Any other state (COMPLETED, FAILED, CANCELLED, TIMEOUT,
# NODE_FAIL, PREEMPTED, PENDING again after a requeue) means the worker is gone. UNKNOWN
# (the scheduler forgot the job, or could not be asked) tells nothing: the heartbeat judges.
ALIVE_STATES = frozenset({"RUNNING", "SUSPENDED", "STOPPED", "CONFIGURING", "RESIZING",
                          "SIGNALING"})


JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\[\]]{0,99}")  # 1234, 1234.pbs1, 12[3]


@dataclass(frozen=True)
class Declared:
    """A RUNNING trial with a pgjob heartbeat, as the sweep reads it."""

    trial_id: int
    study_id: int
    job: str  # "slurm:1234", or "" outside a batch job
    grace: int  # seconds
    silent: float  # seconds since the last heartbeat, by the server's clock


def is_dead(trial: Declared, job_state: str | None) -> bool:
    """Whether a declared trial's worker is gone: its job has ended, or (when no scheduler
    can tell) its heartbeat has been silent for longer than its grace period."""
    if job_state is not None:
        return job_state not in ALIVE_STATES
    return trial.silent > trial.grace


def job_state(job: str) -> str | None:
    """What the scheduler says of a worker's job now, or None when nothing can tell (no
    job recorded, or this node cannot ask that scheduler)."""
    name, _, job_id = job.partition(":")
    # Written by any holder of the app role's password: an id the scheduler's own tools
    # could take for an option is not asked about.
    if not JOB_ID.fullmatch(job_id):
        return None
    try:
        queued = scheduler.query(name, job_id)
    except Exception as exc:  # squeue missing on this node, a timeout: judge by heartbeat
        log.debug("could not ask %s about job %s: %s", name, job_id, exc)
        return None
    return None if queued is None or queued.state == "UNKNOWN" else queued.state


def retry_callback(max_retry: int):
    """Optuna's callback that queues a copy of a failed trial (Optuna 4.9 renamed it; the
    old name still works there but warns)."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry)


_DECLARED = """
select h.trial_id, t.study_id, h.job, h.grace, extract(epoch from now() - h.beat)::float8
from pgjob_heartbeats h join trials t on t.trial_id = h.trial_id
where t.state = 'RUNNING'
"""
# Rows of trials that are no longer running, and requests too old to be repeated.
_TIDY = (
    "delete from pgjob_heartbeats h where not exists (select 1 from trials t "
    "where t.trial_id = h.trial_id and t.state = 'RUNNING')",
    f"delete from pgjob_requests where made < now() - interval '{KEEP}'",
)


class StaleTrialSweeper:
    """Fails the declared trials whose worker is gone, and queues a retry of each.

    One sweep every half grace period, from the serve process, instead of a query before
    every trial in every worker.
    """

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self._engine = None
        self._storage = None

    def _open_storage(self):
        """Optuna's storage, for failing and re-queueing: only once a pgjob worker has
        made the tables. (Built on a database without them, RDBStorage would write a
        version row and stamp a revision of the server's Optuna into a schema that another
        Optuna may be making at that moment.)"""
        import optuna
        from sqlalchemy.pool import NullPool

        # NullPool: a sweep a minute must not hold one of the workers' connections.
        # No compatibility check: the tables are whichever Optuna the workers brought.
        return optuna.storages.RDBStorage(self.url, skip_table_creation=True,
                                          skip_compatibility_check=True,
                                          engine_kwargs={"poolclass": NullPool})

    def declared(self) -> list[Declared]:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        if self._engine is None:
            self._engine = sqlalchemy.create_engine(self.url, poolclass=NullPool)
        with self._engine.begin() as conn:
            if not conn.execute(sqlalchemy.text(
                    "select to_regclass('public.pgjob_heartbeats') is not null")).scalar():
                return []  # no pgjob worker yet: nothing to judge
            for statement in _TIDY:
                conn.execute(sqlalchemy.text(statement))
            return [Declared(*row) for row in conn.execute(sqlalchemy.text(_DECLARED))]

    def sweep(self) -> list[int]:
        """Fail the trials of dead workers; their ids."""
        trials = self.declared()
        states = {job: job_state(job) for job in {t.job for t in trials if t.job}}
        dead = [t for t in trials if is_dead(t, states.get(t.job))]
        return [t.trial_id for t in dead if self._fail(t, states.get(t.job))]

    def _fail(self, trial: Declared, state: str | None) -> bool:
        import optuna
        from optuna.trial import TrialState

        if self._storage is None:
            self._storage = self._open_storage()
        storage = self._storage
        try:
            if not storage.set_trial_state_values(trial.trial_id, TrialState.FAIL):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # it finished meanwhile
        why = f"its job {trial.job} is {state}" if state else \
            f"no heartbeat for {trial.silent:.0f} s (grace period {trial.grace} s)"
        log.info("failed trial %d: %s; queueing a retry", trial.trial_id, why)
        study = optuna.load_study(study_name=storage.get_study_name_from_id(trial.study_id),
                                  storage=storage)
        retry_callback(3)(study, storage.get_trial(trial.trial_id))
        return True

    def close(self) -> None:
        if self._storage is not None:
            self._storage.engine.dispose()
            self._storage = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
