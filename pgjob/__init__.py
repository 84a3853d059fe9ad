"""pgjob: a PostgreSQL server inside a batch job, found by workers in one line."""
from __future__ import annotations

from .errors import PgJobError
from .storage import optuna_storage

__version__ = "0.1.0"
__all__ = ["optuna_storage", "submit", "preview", "attach", "serving", "ServerJob",
           "PgJobError", "__version__"]
_API = ("submit", "preview", "attach", "serving", "ServerJob")


def __getattr__(name: str):
    # The job API imports the schedulers and health checks: only when it is asked for,
    # so that a worker's `import pgjob` stays light.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pgjob' has no attribute {name!r}")
