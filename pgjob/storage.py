"""The Optuna storage workers use: `pgjob.optuna_storage()`.

It finds the server through the home and follows it: when the server restarts or moves to
another node, a call waits (bounded, with backoff) for the endpoint to be published again,
connects to wherever it now is and carries on, so `study.optimize` does too; a repeated
call never does its work twice (retries.py). Every trial it runs has pgjob's heartbeat
(heartbeat.py), and the server fails and re-queues a trial whose worker has died
(trials.py). The class itself is optuna_rdb.PgJobStorage, or on a journal home
optuna_journal.PgJobJournalStorage, imported only here, so that `import pgjob` does not
import Optuna.
"""
from __future__ import annotations

from .errors import UsageError
from .home import open_home


def check_url_works(home) -> None:
    """Refuse to print an Optuna URL for a journal home: an Optuna client given it would
    make RDBStorage tables there and a second, empty study beside the journal's."""
    if home.settings().storage == "journal":
        raise UsageError(
            f"{home.path} keeps its studies in a journal (storage = \"journal\"), which no "
            "URL reaches: in Python use `storage = pgjob.optuna_storage()`; for other "
            "tools copy a study out with `pgjob export`; for psql, `pgjob url --format "
            "libpq` or `pgjob psql`")


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

    On a journal home (setting storage = "journal") it is Optuna's JournalStorage with
    its logs in the server (optuna_journal.py), which Optuna's heartbeat arguments do not
    apply to.
    """
    target = open_home(home).require()
    if target.settings().storage == "journal":
        optuna_own = [name for name, value in (
            ("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period),
            ("heartbeat_stale_trial_callback", heartbeat_stale_trial_callback),
            ("failed_trial_callback", failed_trial_callback)) if value is not None]
        if optuna_own:
            raise UsageError(
                f"{', '.join(optuna_own)}: Optuna's own heartbeat exists only for its "
                f"RDBStorage, and {target.path} keeps its studies in a journal (storage = "
                "\"journal\"). Leave them out: pgjob's heartbeat is always on there, and "
                "the home's heartbeat_interval and grace_period set it")
        from .optuna_journal import PgJobJournalStorage

        return PgJobJournalStorage(target, wait=wait)

    from .optuna_rdb import PgJobStorage

    return PgJobStorage(target, wait=wait,
                        heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                        heartbeat_stale_trial_callback=heartbeat_stale_trial_callback,
                        failed_trial_callback=failed_trial_callback)
