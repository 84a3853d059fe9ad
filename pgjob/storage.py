"""The Optuna storage workers use: it finds the server through the home and follows it.

When the server restarts or moves to another node, an operation fails with a lost
connection. The storage then waits (bounded, with backoff) for the endpoint to be published
again, connects to wherever it now is, and retries the operation, so `study.optimize`
carries on. Every new connection reads the endpoint afresh, so a move needs no new engine.

What may repeat: an operation whose commit reached the server just before the connection
broke is retried once more. For Optuna's writes this means at worst a trial's value,
parameter, attribute or state written twice with the same content, or, for
`create_new_trial`, one extra trial that stays RUNNING until the heartbeat grace period
fails it.
"""
from __future__ import annotations

import functools
import logging
import time

import psycopg

from . import endpoint
from .errors import NotPublished
from .home import Home, open_home
from .heartbeat import Heartbeats
from .waiting import until

log = logging.getLogger("pgjob.storage")

# One connection per worker process, a second only while two are needed at once: for the
# heartbeat thread's write, n_jobs threads, and Optuna's schema check at start, which opens
# a second connection while holding the first (with no overflow at all it deadlocks). The
# second is kept a few seconds for reuse (see pool.py). No pre-ping (a round trip on every
# checkout, ~5 % of a trial): a connection found dead is handled by the retry below.
ENGINE_KWARGS = {"pool_size": 1, "max_overflow": 1, "pool_recycle": 3600, "pool_timeout": 60}

# RDBStorage methods that talk to the database, and so may meet a lost connection; the
# private ones are what Optuna's _CachedStorage (which studies wrap around us) calls.
RETRIED = (
    "_create_new_trial", "_set_trial_param", "_get_best_trial_id", "_get_trials",
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "create_new_trial",
    "set_trial_param", "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials",
    "get_n_trials", "get_best_trial", "get_trial_params", "get_trial_user_attrs",
    "get_trial_system_attrs", "check_trial_is_updatable",
)


def is_connection_loss(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is a lost or refused connection, not a bad query."""
    import sqlalchemy.exc

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and not \
                isinstance(exc, psycopg.errors.QueryCanceled):
            return True
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "orig", None)
    return False


def _prepare(found: endpoint.Endpoint) -> dict:
    """pgbouncer (transaction pooling) cannot keep a prepared statement from one transaction
    to the next, so behind it psycopg must prepare none; otherwise psycopg's default."""
    return {"prepare_threshold": None if found.pooler else 5}


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc.__cause__ or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _make_storage_class():
    import optuna

    from .pool import SparePool  # imports SQLAlchemy: only where a storage is made
    from optuna.trial import TrialState

    class PgJobStorage(optuna.storages.RDBStorage):
        """RDBStorage that follows a pgjob server across restarts and node moves."""

        def __init__(self, home: Home, *, wait: float, heartbeat_interval: float,
                     grace_period: float) -> None:
            self.pgjob_home = home
            self.pgjob_wait = wait
            # Back off no longer than a quarter of the grace period, so that a worker is
            # back with a heartbeat well before its running trial could be judged dead.
            self.pgjob_pause = min(5.0, max(0.5, grace_period / 4))
            found = endpoint.wait_connectable(home, timeout=wait)
            super().__init__(found.sqlalchemy_url(),
                             engine_kwargs={**ENGINE_KWARGS, "poolclass": SparePool,
                                            "connect_args": _prepare(found)},
                             skip_table_creation=True)
            import sqlalchemy

            sqlalchemy.event.listen(self.engine, "do_connect", self._connect_to_current)
            self.pgjob_heartbeats = Heartbeats(self.engine, heartbeat_interval)

        # Optuna's per-trial heartbeat thread is replaced by one thread per process
        # (see heartbeat.py); Optuna sees no heartbeat interval, so it neither starts its
        # own threads nor checks for stale trials before every trial (the server does).
        def get_heartbeat_interval(self):
            return None

        def _create_new_trial(self, study_id, template_trial=None):
            frozen = super()._create_new_trial(study_id, template_trial)
            if frozen.state == TrialState.RUNNING:
                self.pgjob_heartbeats.started(frozen._trial_id)
            return frozen

        def set_trial_state_values(self, trial_id, state, values=None):
            updated = super().set_trial_state_values(trial_id, state, values)
            if state == TrialState.RUNNING and updated:
                self.pgjob_heartbeats.started(trial_id)
            elif state.is_finished():
                self.pgjob_heartbeats.finished(trial_id)
            return updated

        def _connect_to_current(self, dialect, _record, cargs, cparams):
            """Every new connection goes to wherever the endpoint says the server is now."""
            def attempt():
                found = endpoint.read(self.pgjob_home)
                if found is None:
                    return None
                try:
                    return dialect.loaded_dbapi.connect(*cargs, **{
                        **cparams, "host": found.host, "port": found.port,
                        "passfile": found.passfile, "sslrootcert": found.sslrootcert,
                        **_prepare(found)})
                except psycopg.OperationalError:
                    return None
            conn = until(attempt, self.pgjob_wait, interval=0.2, max_interval=self.pgjob_pause)
            if conn is None:
                raise NotPublished(f"no server answered for {self.pgjob_home.path} within "
                                   f"{self.pgjob_wait:.0f} s; check `pgjob status`")
            return conn

    for name in RETRIED:
        if hasattr(PgJobStorage, name):
            setattr(PgJobStorage, name, _retrying(name, getattr(PgJobStorage, name)))
    return PgJobStorage


def _retrying(name: str, base):
    """`base` (a storage method), retried across lost connections."""

    @functools.wraps(base)
    def method(self, *args, **kwargs):
        deadline = time.monotonic() + self.pgjob_wait
        pause = 0.5
        while True:
            try:
                return base(self, *args, **kwargs)
            except Exception as exc:
                if not is_connection_loss(exc) or time.monotonic() > deadline:
                    raise
                log.warning("the server could not complete %s (%s); waiting for it to "
                            "come back (home %s)", name, _first_line(exc),
                            self.pgjob_home.path)
                self.engine.dispose()  # every pooled connection went to the old server
                time.sleep(pause)
                pause = min(pause * 2, self.pgjob_pause)
    return method


@functools.lru_cache(maxsize=None)
def storage_class():
    return _make_storage_class()


def optuna_storage(home=None, *, wait: float = 600.0, heartbeat_interval: int | None = None,
                   grace_period: int | None = None):
    """An Optuna storage on the server published for `home` (default: $PGJOB_HOME).

    Waits up to `wait` seconds for the server, at start and whenever the connection is lost
    (a restart, a move to another node). Every running trial has a heartbeat (interval and
    grace period from the home's settings unless given); the server fails a trial whose
    heartbeat stops for the grace period (its worker died) and queues a retry of it.
    """
    home_obj = open_home(home).require()
    settings = home_obj.settings()
    return storage_class()(home_obj, wait=wait,
                           heartbeat_interval=heartbeat_interval or settings.heartbeat_interval,
                           grace_period=grace_period or settings.grace_period)
