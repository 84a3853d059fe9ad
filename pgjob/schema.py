"""Optuna's tables, made once by the server so that workers never race to create them."""
from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

from .cluster import connect
from .home import Settings

log = logging.getLogger("pgjob.schema")


def socket_url(socket_dir: Path, port: int, settings: Settings, passfile: Path) -> str:
    return (f"postgresql+psycopg://{quote(settings.user)}@/{quote(settings.database)}"
            f"?host={quote(str(socket_dir))}&port={port}&passfile={quote(str(passfile))}")


def has_optuna_schema(socket_dir: Path, port: int, settings: Settings, passfile: Path) -> bool:
    with connect(host=str(socket_dir), port=port, user=settings.user,
                 dbname=settings.database, passfile=passfile) as conn:
        row = conn.execute("select to_regclass('public.version_info') is not null and "
                           "to_regclass('public.alembic_version') is not null").fetchone()
    return bool(row[0])


def ensure_optuna_schema(socket_dir: Path, port: int, settings: Settings,
                         passfile: Path) -> None:
    """Create Optuna's schema as the application role (so it owns the tables), once.

    The check is one query; optuna is imported only the first time, which keeps every
    later start fast.
    """
    if has_optuna_schema(socket_dir, port, settings, passfile):
        return
    import optuna

    log.info("creating the Optuna schema in database %s", settings.database)
    storage = optuna.storages.RDBStorage(socket_url(socket_dir, port, settings, passfile))
    storage.engine.dispose()
