"""The Optuna storage workers use: `pgjob.optuna_storage()`.

It finds the server through the home and follows it: when the server restarts or moves to
another node, a call waits (bounded, with backoff) for the endpoint to be published again,
connects to wherever it now is and carries on, so `study.optimize` does too; a repeated
call never does its work twice (retries.py). Every trial it runs has pgjob's heartbeat
(heartbeat.py), and the server fails and re-queues a trial whose worker has died
(trials.py). The class itself is optuna_rdb.PgJobStorage, imported only here, so that
`import pgjob` does not import Optuna.
"""
from __future__ import annotations

from .home import open_home


def optuna_storage(home=None, *, wait: float = 600.0, heartbeat_interval: int | None = None,
                   grace_period: int | None = None, heartbeat_stale_trial_callback=None,
                   failed_trial_callback=None):
    """An Optuna storage on the server published for `home` (default: $PGJOB_HOME).

    Waits up to `wait` seconds for the server, at start and whenever the connection is lost
    (a restart, a move to another node).

    Every trial this storage runs has pgjob's heartbeat, at the home's `heartbeat_interval`;
    the server fails a trial whose heartbeat stops for the home's `grace_period` (or whose
    batch job has ended) and queues a retry of it. `heartbeat_interval`, `grace_period`
    and the callbacks given here are Optuna's own, with Optuna's meaning (see RDBStorage):
    Optuna's per-trial heartbeat, judged by the workers themselves.
    """
    from .optuna_rdb import PgJobStorage

    return PgJobStorage(open_home(home).require(), wait=wait,
                        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                        heartbeat_stale_trial_callback=heartbeat_stale_trial_callback,
                        failed_trial_callback=failed_trial_callback)
