"""The Optuna storage workers use: found through the home, with a small bounded pool."""
from __future__ import annotations

from . import endpoint
from .home import open_home

# One connection per worker process normally, a second only while Optuna briefly needs
# two (its schema check holds one while opening another; with no overflow it deadlocks).
ENGINE_KWARGS = {"pool_size": 1, "max_overflow": 1, "pool_pre_ping": True,
                 "pool_recycle": 3600, "pool_timeout": 60}


def optuna_storage(home=None, *, wait: float = 600.0):
    """An optuna RDBStorage on the server published for `home` (default: $PGJOB_HOME).

    Waits up to `wait` seconds for the server to be published and to accept connections,
    so workers may start before the server does.
    """
    import optuna

    found = endpoint.wait_connectable(open_home(home).require(), timeout=wait)
    return optuna.storages.RDBStorage(found.sqlalchemy_url(), engine_kwargs=dict(ENGINE_KWARGS),
                                      skip_table_creation=True)
