"""Server-side care of Optuna's trials: heartbeats across a move, stale trials failed."""
from __future__ import annotations

import logging
import warnings

import psycopg

from .home import Settings

log = logging.getLogger("pgjob.trials")

_REFRESH = """
update trial_heartbeats h set heartbeat = now()
from trials t where t.trial_id = h.trial_id and t.state = 'RUNNING'
"""


def refresh_heartbeats(conn: psycopg.Connection) -> int:
    """Give every running trial a fresh heartbeat when a server (re)starts.

    Workers could not send heartbeats while there was no server; without this, the first
    worker back would fail every other worker's live trial as stale.
    """
    if not conn.execute("select to_regclass('public.trial_heartbeats') is not null").fetchone()[0]:
        return 0
    return conn.execute(_REFRESH).rowcount


# A RUNNING trial with no heartbeat at all, in a study whose workers send heartbeats: its
# worker died before its first heartbeat (or a retried create_new_trial left it behind).
# It gets a heartbeat now, so that it is failed a grace period later unless a worker
# speaks up for it. (Its start time cannot serve: Optuna writes it in the worker's local
# time zone, heartbeats are in the server's.)
_ADOPT = """
insert into trial_heartbeats (trial_id, heartbeat)
select t.trial_id, now() from trials t
where t.state = 'RUNNING'
  and not exists (select 1 from trial_heartbeats h where h.trial_id = t.trial_id)
  and exists (select 1 from trial_heartbeats h join trials o on o.trial_id = h.trial_id
              where o.study_id = t.study_id)
on conflict (trial_id) do nothing
"""


def retry_callback(max_retry: int):
    """Optuna's callback that queues a copy of a trial failed for a stale heartbeat.

    Optuna 4.9 renamed it; the old name still works there but warns.
    """
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry)


class StaleTrialSweeper:
    """Fails trials whose heartbeat stopped (their worker died), and queues a retry.

    Workers using pgjob's storage leave this to the server (see heartbeat.py): one sweep
    every half grace period instead of a query before every trial in every worker.
    """

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self._storage = None

    def _open(self):
        import optuna
        from sqlalchemy.pool import NullPool

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # NullPool: a sweep a minute must not hold one of the workers' connections
            return optuna.storages.RDBStorage(
                self.url, skip_table_creation=True, skip_compatibility_check=True,
                engine_kwargs={"poolclass": NullPool},
                heartbeat_interval=self.settings.heartbeat_interval,
                grace_period=self.settings.grace_period,
                heartbeat_stale_trial_callback=retry_callback(3))

    def sweep(self) -> None:
        import optuna

        if self._storage is None:
            self._storage = self._open()
        import sqlalchemy

        with self._storage.engine.begin() as conn:
            conn.execute(sqlalchemy.text(_ADOPT))
        for summary in self._storage.get_all_studies():
            study = optuna.load_study(study_name=summary.study_name, storage=self._storage)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)

    def close(self) -> None:
        if self._storage is not None:
            self._storage.engine.dispose()
            self._storage = None
