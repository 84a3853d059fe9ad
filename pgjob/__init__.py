"""pgjob: a PostgreSQL server inside a batch job, found by workers in one line."""
from __future__ import annotations

from .errors import PgJobError
from .storage import optuna_storage

__version__ = "0.1.0"
__all__ = ["optuna_storage", "PgJobError", "__version__"]
