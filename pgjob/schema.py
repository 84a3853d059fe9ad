"""Optuna's tables, made once (at init, or by the server) so that workers never race to
create them.

The fast way is pgjob's prepared copy of Optuna's schema (optuna_schema.sql), applied in one
round trip without importing Optuna; it is used only when the installed Optuna's newest
schema revision is the one it was made from. Otherwise Optuna creates its tables itself.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
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


PREPARED = Path(__file__).with_name("optuna_schema.sql")
PREPARED_REVISION = "v3.2.0.a"
SCHEMA_VERSION = 12  # Optuna's version_info.schema_version, frozen by Optuna since 2.x


def optuna_schema_revision() -> str | None:
    """The newest alembic revision of the installed Optuna, read from its files (importing
    Optuna costs about 0.4 s), or None when it cannot be told."""
    spec = importlib.util.find_spec("optuna")
    if spec is None or spec.origin is None:
        return None
    versions = Path(spec.origin).parent / "storages" / "_rdb" / "alembic" / "versions"
    revisions, parents = set(), set()
    for script in versions.glob("*.py"):
        text = script.read_text()
        rev = re.search(r'^revision\s*=\s*"([^"]+)"', text, re.M)
        down = re.search(r'^down_revision\s*=\s*"([^"]+)"', text, re.M)
        if rev:
            revisions.add(rev.group(1))
        if down:
            parents.add(down.group(1))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _apply_prepared(conn) -> None:
    with conn.transaction():  # all of it or nothing, so a failed init can simply re-run
        conn.execute(PREPARED.read_text())
        conn.execute("insert into public.version_info values (1, %s, %s)",
                     (SCHEMA_VERSION, importlib.metadata.version("optuna")))


def ensure_optuna_schema(socket_dir: Path, port: int, settings: Settings,
                         passfile: Path) -> None:
    """Create Optuna's schema as the application role (so it owns the tables), once.

    The check is one query, and the prepared schema needs no Optuna import, which keeps
    every start fast.
    """
    if has_optuna_schema(socket_dir, port, settings, passfile):
        return
    if optuna_schema_revision() == PREPARED_REVISION:
        log.debug("creating the Optuna schema in database %s", settings.database)
        with connect(host=str(socket_dir), port=port, user=settings.user,
                     dbname=settings.database, passfile=passfile) as conn:
            _apply_prepared(conn)
        return
    import optuna

    log.info("creating the Optuna schema in database %s", settings.database)
    storage = optuna.storages.RDBStorage(socket_url(socket_dir, port, settings, passfile))
    storage.engine.dispose()
