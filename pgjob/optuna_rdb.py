"""PgJobStorage: Optuna's RDBStorage on a pgjob server, which it follows across moves.

It is Optuna's RDBStorage with four things added, and nothing of Optuna's taken away:
- every new connection goes to wherever the home's endpoint says the server is now, and a
  call that meets a lost connection waits for the server and is repeated without doing
  anything twice (retries.py);
- pgjob's liveness for the trials this process runs (heartbeat.py), which the server
  judges (trials.py); Optuna's own heartbeat arguments keep their Optuna meaning;
- the tables are made under a lock by whichever worker comes first (schema.py);
- it pickles (the connection state is rebuilt on unpickling, from the endpoint of then)
  and survives fork (a child drops the parent's connections without closing them and
  starts its own, as SQLAlchemy advises).

Importing this module imports Optuna and SQLAlchemy; `pgjob.optuna_storage` does it only
when a storage is made.
"""
from __future__ import annotations

import os
import weakref
from datetime import datetime

import optuna
import psycopg
import sqlalchemy
import sqlalchemy.orm
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _VersionManager
from optuna.trial import TrialState
from sqlalchemy.pool import NullPool

from . import endpoint, heartbeat, retries, schema
from .errors import NotPublished
from .home import Home
from .pool import SparePool
from .waiting import until

# One connection per worker process, a second only while two are needed at once: for the
# heartbeat thread's write, n_jobs threads, and Optuna's schema check at start, which opens
# a second connection while holding the first (with no overflow at all it deadlocks). The
# second is kept a few seconds for reuse (see pool.py). No pre-ping (a round trip on every
# checkout, ~5 % of a trial): a connection found dead is handled by the retry.
ENGINE_KWARGS = {"poolclass": SparePool, "pool_size": 1, "max_overflow": 1,
                 "pool_recycle": 3600, "pool_timeout": 60}

# The RDBStorage methods that talk to the database, so may meet a lost connection, and are
# repeated as they are (a repeat writes the same content again); the private ones are what
# Optuna's _CachedStorage calls. The ones that could do something twice are methods below.
REPEATED = (
    "_get_best_trial_id", "_get_trials", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "get_trial_param",
    "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial",
    "get_all_trials", "get_n_trials", "get_best_trial", "get_trial_params",
    "get_trial_user_attrs", "get_trial_system_attrs", "record_heartbeat",
    "_get_stale_trial_ids",
    # a repeated parameter is no error: Optuna ignores the duplicate key
    "_set_trial_param",
)

_LIVE: "weakref.WeakSet[PgJobStorage]" = weakref.WeakSet()


def _prepare(found: endpoint.Endpoint) -> dict:
    """pgbouncer (transaction pooling) cannot keep a prepared statement from one transaction
    to the next, so behind it psycopg must prepare none; otherwise psycopg's default."""
    return {"prepare_threshold": None if found.pooler else 5}


class _Connector:
    """The engine's do_connect hook: each new connection goes to wherever the endpoint says
    the server is now. It holds no reference to the storage, so that a storage nobody
    uses any more is freed (and its heartbeat thread ends)."""

    def __init__(self, home: Home, wait: float, pause: float) -> None:
        self.home, self.wait, self.pause = home, wait, pause

    def __call__(self, dialect, _record, cargs, cparams):
        def attempt():
            found = endpoint.read(self.home)
            if found is None:
                return None
            try:
                return dialect.loaded_dbapi.connect(*cargs, **{
                    **cparams, "host": found.host, "port": found.port,
                    "passfile": found.passfile, "sslrootcert": found.sslrootcert,
                    **_prepare(found)})
            except psycopg.OperationalError:
                return None
        conn = until(attempt, self.wait, interval=0.2, max_interval=self.pause)
        if conn is None:
            raise NotPublished(f"no server answered for {self.home.path} within "
                               f"{self.wait:.0f} s; check `pgjob status`")
        return conn


def _close(engine, beats: heartbeat.Heartbeats) -> None:
    beats.new_trial.set()  # wake the thread, which finds its storage gone and ends
    engine.dispose()


class PgJobStorage(optuna.storages.RDBStorage):
    """RDBStorage that follows a pgjob server across restarts and node moves."""

    def __init__(self, home: Home, *, wait: float = 600.0,
                 heartbeat_interval: int | None = None, grace_period: int | None = None,
                 heartbeat_stale_trial_callback=None, failed_trial_callback=None) -> None:
        settings = home.settings()
        self.pgjob_home = home
        self.pgjob_wait = wait
        # Trials run with Optuna's own heartbeat are judged by Optuna in the workers, with
        # the user's callback; the server must not judge them too.
        self.pgjob_liveness = (settings.heartbeat_interval, settings.grace_period,
                               heartbeat_interval is None)
        # Back off no longer than a quarter of the grace period, so that a worker is back
        # with a heartbeat well before its running trial could be judged dead.
        self.pgjob_pause = min(5.0, max(0.5, settings.grace_period / 4))
        # Optuna's heartbeat arguments go to Optuna as they are, to be checked and used as
        # Optuna does (an Optuna without the newer name gets none of it)
        optuna_args = {name: value for name, value in (
            ("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period),
            ("heartbeat_stale_trial_callback", heartbeat_stale_trial_callback),
            ("failed_trial_callback", failed_trial_callback)) if value is not None}
        found = endpoint.wait_connectable(home, timeout=wait)
        self._make_tables(found)
        super().__init__(found.sqlalchemy_url(), skip_table_creation=True,
                         engine_kwargs={**ENGINE_KWARGS, "connect_args": _prepare(found)},
                         **optuna_args)
        self._follow()

    def _make_tables(self, found: endpoint.Endpoint) -> None:
        # before RDBStorage's version check, which needs the tables
        engine = sqlalchemy.create_engine(found.sqlalchemy_url(), poolclass=NullPool,
                                          connect_args=_prepare(found))
        try:
            with engine.connect() as conn:
                schema.check_kind(lambda query: conn.exec_driver_sql(query).fetchone(),
                                  self.pgjob_home)
            schema.ensure_tables(engine, (heartbeat.TABLE, retries.TABLE))
        finally:
            engine.dispose()

    def _follow(self) -> None:
        sqlalchemy.event.listen(self.engine, "do_connect",
                                _Connector(self.pgjob_home, self.pgjob_wait, self.pgjob_pause))
        self.pgjob_heartbeats = heartbeat.Heartbeats(self, *self.pgjob_liveness)
        weakref.finalize(self, _close, self.engine, self.pgjob_heartbeats)
        _LIVE.add(self)

    def pgjob_beat(self, params: dict) -> set[int]:
        """One heartbeat for the trials `params["ids"]`; those still RUNNING."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql("set local synchronous_commit = off")
            return {row[0] for row in conn.exec_driver_sql(heartbeat.BEAT, params)}

    # -- pickling: the connection state is rebuilt, where the server is then ------------

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("pgjob_heartbeats", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        found = endpoint.wait_connectable(self.pgjob_home, timeout=self.pgjob_wait)
        self.url = found.sqlalchemy_url()
        self.engine = sqlalchemy.create_engine(self.url, **self.engine_kwargs)
        self.scoped_session = sqlalchemy.orm.scoped_session(
            sqlalchemy.orm.sessionmaker(bind=self.engine))
        self._follow()
        self._version_manager = _VersionManager(self.url, self.engine, self.scoped_session)
        if not self.skip_compatibility_check:
            self._version_manager.check_table_schema_compatibility()

    def _forked(self) -> None:
        """In a child after fork: the parent's connections and trials are not ours."""
        self.engine.dispose(close=False)
        self.pgjob_heartbeats = heartbeat.Heartbeats(self, *self.pgjob_liveness)

    # -- writes that must not happen twice ------------------------------------------------

    def _create_new_trial(self, study_id, template_trial=None):
        base = super()._create_new_trial
        with retries.new_trial_request():
            frozen, _ = retries.call(self, "_create_new_trial",
                                     lambda: base(study_id, template_trial))
        # a copy (add_trial, copy_study, a retry) is nobody's trial to run, so not ours
        if template_trial is None and frozen.state == TrialState.RUNNING:
            self.pgjob_heartbeats.started(frozen._trial_id)
        return frozen

    def _get_prepared_new_trial(self, study_id, template_trial, session):
        base = super()._get_prepared_new_trial
        return retries.made_once(session, lambda: base(study_id, template_trial, session),
                                 lambda trial_id: session.get(models.TrialModel, trial_id))

    def set_trial_state_values(self, trial_id, state, values=None):
        base = super().set_trial_state_values
        asked = datetime.now()

        def settle(exc):
            if isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
                done = self.get_trial(trial_id)
                if done.state == state and (values is None or
                                            list(done.values or ()) == list(values)):
                    return True  # the lost attempt had set it
            return retries.NOT_SETTLED
        updated, repeated = retries.call(self, "set_trial_state_values",
                                         lambda: base(trial_id, state, values), settle)
        if state == TrialState.RUNNING and not updated and repeated:
            updated = self._claimed_by_lost_attempt(trial_id, asked)
        if state == TrialState.RUNNING and updated:
            self.pgjob_heartbeats.started(trial_id)
        elif state.is_finished():
            self.pgjob_heartbeats.finished(trial_id)
        return updated

    def _claimed_by_lost_attempt(self, trial_id: int, asked: datetime) -> bool:
        """Whether a claim from WAITING that lost its reply had succeeded: the trial is
        RUNNING, started (by this machine's clock, which Optuna writes) between the claim
        and now, and no other worker has sent a heartbeat for it."""
        trial = self.get_trial(trial_id)
        if trial.state != TrialState.RUNNING or trial.datetime_start is None:
            return False
        if not asked <= trial.datetime_start <= datetime.now():
            return False
        with self.engine.connect() as conn:
            other = conn.exec_driver_sql(
                "select worker from pgjob_heartbeats where trial_id = %(t)s",
                {"t": trial_id}).scalar()
        return other is None or other == self.pgjob_heartbeats.params["worker"]

    def create_new_study(self, directions, study_name=None):
        base = super().create_new_study

        def settle(exc):
            if isinstance(exc, optuna.exceptions.DuplicatedStudyError) and study_name:
                return self.get_study_id_from_name(study_name)  # the lost attempt made it
            return retries.NOT_SETTLED
        return retries.call(self, "create_new_study",
                            lambda: base(directions, study_name), settle)[0]

    def delete_study(self, study_id):
        base = super().delete_study

        def settle(exc):
            return None if isinstance(exc, KeyError) else retries.NOT_SETTLED
        retries.call(self, "delete_study", lambda: base(study_id), settle)


def _repeated(name: str, base):
    def method(self, *args, **kwargs):
        return retries.call(self, name, lambda: base(self, *args, **kwargs))[0]
    method.__name__ = name
    method.__qualname__ = f"PgJobStorage.{name}"
    method.__doc__ = base.__doc__
    return method


for _name in REPEATED:
    if hasattr(optuna.storages.RDBStorage, _name):
        setattr(PgJobStorage, _name, _repeated(_name, getattr(optuna.storages.RDBStorage,
                                                              _name)))


def _after_fork_in_child() -> None:
    for storage in list(_LIVE):
        storage._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
