"""Server-side care of Optuna's trials: heartbeats across a restart, dead workers' trials
failed and re-queued.

The server judges only the trials whose workers declared pgjob heartbeats (a row in
`pgjob_heartbeats`, see heartbeat.py). A trial of a plain Optuna client (the `pgjob url`
string, Optuna's CLI, an integration with its own RDBStorage) has none and is left to that
client's own settings: the server never fails it. For a declared trial the worker's batch
job, when it recorded one, is the better witness than a late heartbeat: a job still running
keeps its trial, a job that has ended loses it at once, and so does a job requeued and
running again since the trial was taken (the worker recorded which run of its job it was).

Which trials are RUNNING, and in which study, is the storage's to say: Optuna's tables on
an rdb home (RdbTrials), the journal's logs on a journal home (JournalTrials, which keeps
the journal replayed in the serve process). The judgement (`is_dead`) and the retry are
the same for both.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import psycopg

from . import schedulers
from .home import Home
from .settings import Settings
from .retries import KEEP
from .schema import kind_of_studies, kinds_in_use

log = logging.getLogger("pgjob.trials")


_REFRESH = ("update {table} h set {column} = now() from trials t "
            "where t.trial_id = h.trial_id and t.state = 'RUNNING'")


def refresh_heartbeats(conn: psycopg.Connection) -> int:
    """Give every running trial a fresh heartbeat when a server (re)starts, pgjob's and
    Optuna's alike.

    Workers could not send heartbeats while there was no server; without this, the first
    worker back (or the server's sweep) would fail every other worker's live trial. A
    journal home's trial states are in its logs, which serve does not read at start: there
    every row is refreshed, and the next sweep tidies those of trials no longer running.
    """
    trials, pgjob_beats, optuna_beats, journal = conn.execute(
        "select to_regclass('public.trials') is not null, "
        "to_regclass('public.pgjob_heartbeats') is not null, "
        "to_regclass('public.trial_heartbeats') is not null, "
        "to_regclass('public.pgjob_journal') is not null").fetchone()
    statements = []  # none before the first worker: no trial to refresh
    if pgjob_beats and journal:
        statements.append("update pgjob_heartbeats set beat = now()")
    elif pgjob_beats and trials:
        statements.append(_REFRESH.format(table="pgjob_heartbeats", column="beat"))
    if optuna_beats and trials:  # Optuna's own, of clients that asked for them
        statements.append(_REFRESH.format(table="trial_heartbeats", column="heartbeat"))
    return sum(conn.execute(statement).rowcount for statement in statements)


# Job states in which the worker's process may still run its trial (Slurm's names; the
# PBS and LSF schedulers translate theirs). Any other state (COMPLETED, FAILED, CANCELLED,
# TIMEOUT, NODE_FAIL, PREEMPTED, PENDING again after a requeue, and REQUEUED: running again
# in a later run than the worker's) means the worker is gone. UNKNOWN
# (the scheduler forgot the job, or could not be asked) tells nothing: the heartbeat judges.
ALIVE_STATES = frozenset({"RUNNING", "SUSPENDED", "STOPPED", "CONFIGURING", "RESIZING",
                          "SIGNALING"})


JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\[\]]{0,99}")  # 1234, 1234.pbs1, 12[3]


@dataclass(frozen=True)
class Declared:
    """A RUNNING trial with a pgjob heartbeat, as the sweep reads it."""

    trial_id: int
    study_id: int
    job: str  # "slurm:1234@0" (scheduler, id, run), "pbs:12.pbs1", or "" outside a batch job
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
    job recorded, or this node cannot ask that scheduler). A job that runs again after a
    requeue, in a later run than the worker recorded, is "REQUEUED": the worker is gone."""
    name, _, rest = job.partition(":")
    job_id, at, run = rest.partition("@")
    # Written by any holder of the app role's password: an id the scheduler's own tools
    # could take for an option is not asked about.
    if not JOB_ID.fullmatch(job_id) or at and not run.isdigit():
        return None
    try:
        queued = schedulers.query(name, job_id)
        if queued is None or queued.state == "UNKNOWN":
            return None
        if at and queued.state in ALIVE_STATES and \
                (schedulers.restarts(name, job_id) or 0) > int(run):
            return "REQUEUED"
    except Exception as exc:  # squeue missing on this node, a timeout: judge by heartbeat
        log.debug("could not ask %s about job %s: %s", name, job_id, exc)
        return None
    return queued.state


def retry_callback(max_retry: int):
    """Optuna's callback that queues a copy of a failed trial (Optuna 4.9 renamed it; the
    old name still works there but warns)."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry)


def split_beats(beats: Iterable[tuple[int, str, int, float]],
                running: Mapping[int, int]) -> tuple[list[Declared], list[int]]:
    """A journal home's heartbeat rows (trial id, job, grace, seconds silent) against what
    its journal says: the declared trials that are RUNNING, each with its study (`running`
    maps trial id to study id), and the ids of the rows to tidy (trials that finished, were
    failed, or went with their deleted study)."""
    declared, gone = [], []
    for trial_id, job, grace, silent in beats:
        if trial_id in running:
            declared.append(Declared(trial_id, running[trial_id], job, grace, silent))
        else:
            gone.append(trial_id)
    return declared, gone


def fail_and_retry(storage, trial: Declared, why: str) -> bool:
    """Fail a dead worker's trial through an Optuna storage of either kind and queue its
    retry; False when it finished (or was failed) meanwhile."""
    import optuna
    from optuna.trial import TrialState

    try:
        if not storage.set_trial_state_values(trial.trial_id, TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # it finished meanwhile
    log.info("failed trial %d: %s; queueing a retry", trial.trial_id, why)
    study = optuna.load_study(study_name=storage.get_study_name_from_id(trial.study_id),
                              storage=storage)
    retry_callback(3)(study, storage.get_trial(trial.trial_id))
    return True


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
_BEATS = "select trial_id, job, grace, extract(epoch from now() - beat)::float8 " \
         "from pgjob_heartbeats"


class RdbTrials:
    """An rdb home's trials: Optuna's tables, read with SQL; Optuna's RDBStorage, made only
    once a trial must be failed, fails and re-queues."""

    tables = ("pgjob_heartbeats", "pgjob_requests", "trials")

    def __init__(self, url: str) -> None:
        self.url = url
        self._storage = None

    def declared(self, conn: psycopg.Connection) -> list[Declared]:
        with conn.transaction():
            for statement in _TIDY:
                conn.execute(statement)
            return [Declared(*row) for row in conn.execute(_DECLARED)]

    def fail(self, trial: Declared, why: str) -> bool:
        if self._storage is None:
            self._storage = self._open_storage()
        return fail_and_retry(self._storage, trial, why)

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

    def rest(self) -> None:
        pass  # NullPool: nothing is held between sweeps

    def close(self) -> None:
        if self._storage is not None:
            self._storage.engine.dispose()
            self._storage = None


class JournalTrials:
    """A journal home's trials: the journal replayed in the serve process by Optuna's own
    JournalStorage, kept from sweep to sweep, so each sweep reads only the logs appended
    since the last (the first starts from the signed snapshot, when there is one for the
    server's Optuna). Failing a trial and queueing its retry append their logs."""

    tables = ("pgjob_heartbeats", "pgjob_journal", "pgjob_journal_head")

    def __init__(self, home: Home, dial: Callable[[], psycopg.Connection]) -> None:
        self.home = home
        self.dial = dial
        self._storage = None

    def storage(self):
        if self._storage is None:
            import optuna

            from .journal import PgJournalBackend

            # wait=0: a lost server fails this sweep at once (serve's loop, not the sweep,
            # brings it back); no tables are made, nor the database's kind judged here.
            backend = PgJournalBackend(self.home, wait=0, dial=self.dial, prepare=False)
            self._storage = optuna.storages.JournalStorage(backend)
        return self._storage

    def declared(self, conn: psycopg.Connection) -> list[Declared]:
        # The rows first, the journal after: a worker writes a trial's row only once its
        # log is in, so every row read here is of a trial the replay then knows.
        beats = conn.execute(_BEATS).fetchall()
        declared, gone = split_beats(beats, self._running([row[0] for row in beats]))
        if gone:
            conn.execute("delete from pgjob_heartbeats where trial_id = any(%s)", (gone,))
        return declared

    def _running(self, ids: list[int]) -> dict[int, int]:
        """{trial id: study id} of those of `ids` that are RUNNING in a live study, after
        reading the new logs. Looked up in the replay itself, as optuna_journal.py does:
        Optuna's public calls would each read the journal again, per trial or study."""
        from optuna.trial import TrialState

        storage = self.storage()
        with storage._thread_lock:
            storage._sync_with_backend()
            replay = storage._replay_result
            found = {}
            for trial_id in ids:
                trial = replay._trials.get(trial_id)
                study_id = replay._trial_id_to_study_id.get(trial_id)
                if trial is not None and trial.state == TrialState.RUNNING and \
                        study_id in replay._studies:
                    found[trial_id] = study_id
            return found

    def fail(self, trial: Declared, why: str) -> bool:
        return fail_and_retry(self.storage(), trial, why)

    def rest(self) -> None:
        """Between sweeps no connection is held (the replay is kept)."""
        if self._storage is not None:
            self._storage._backend.close()

    def close(self) -> None:
        self.rest()
        self._storage = None


LOCK_WAIT = "10s"  # how long a sweep waits for a row a worker holds


class StaleTrialSweeper:
    """Fails the declared trials whose worker is gone, and queues a retry of each.

    One sweep every half grace period, from the serve process, instead of a query before
    every trial in every worker. Each sweep looks at which kind of studies the database
    holds (whatever serve's own setting: a worker may have been given another
    PGJOB_STORAGE) and judges that kind's trials; nothing is built, and Optuna is not
    imported, before that kind's tables exist.
    """

    def __init__(self, home: Home, settings: Settings, url: str,
                 connect: Callable[[], psycopg.Connection]) -> None:
        self.settings = settings
        self.connect = connect  # a new connection to the study database, as the app role
        self.kinds = {"rdb": RdbTrials(url), "journal": JournalTrials(home, connect)}

    def _trials(self, conn: psycopg.Connection):
        """The kind of trials to judge, or None while its tables do not exist."""
        def fetch(query):
            return conn.execute(query).fetchone()
        trials = self.kinds[kind_of_studies(kinds_in_use(fetch), self.settings.storage)]
        present = fetch("select " + ", ".join(f"to_regclass('public.{table}') is not null"
                                              for table in trials.tables))
        return trials if all(present) else None

    def sweep(self) -> list[int]:
        """Fail the trials of dead workers; their ids."""
        trials = None
        try:
            with self.connect() as conn:
                # A worker stopped (SIGSTOP, a frozen node) inside a transaction holds its
                # rows: this sweep gives up on them, and the next one tries again.
                conn.execute(f"set lock_timeout = '{LOCK_WAIT}'")
                trials = self._trials(conn)
                if trials is None:
                    return []  # no pgjob worker yet: nothing to judge
                declared = trials.declared(conn)
            states = {job: job_state(job) for job in {t.job for t in declared if t.job}}
            return [t.trial_id for t in declared if is_dead(t, states.get(t.job))
                    and trials.fail(t, _why(t, states.get(t.job)))]
        finally:
            if trials is not None:
                trials.rest()

    def close(self) -> None:
        for trials in self.kinds.values():
            trials.close()


def _why(trial: Declared, state: str | None) -> str:
    if state == "REQUEUED":
        return f"its job {trial.job.partition('@')[0]} was requeued and runs again without it"
    return f"its job {trial.job} is {state}" if state else \
        f"no heartbeat for {trial.silent:.0f} s (grace period {trial.grace} s)"
