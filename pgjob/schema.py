"""Optuna's tables in a study database: made by the first pgjob worker, never by the server.

A pgjob server serves whichever Optuna its workers bring, so neither `pgjob init` nor
`pgjob serve` fixes a schema: the first client creates its own tables, as Optuna always
does. pgjob's storage does that under a transaction-level advisory lock, so that workers
starting at once never race on CREATE TABLE (a plain Optuna client may; see docs/guide.md),
and it adds pgjob's own two small tables there (heartbeat.py, retries.py).

The fast way is pgjob's prepared copy of Optuna's schema (optuna_schema.sql), applied in
one round trip; it is used only when the worker's Optuna has exactly the alembic revision it
was made from. Otherwise Optuna's own models create the tables.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

from .settings import Settings

PREPARED = Path(__file__).with_name("optuna_schema.sql")
PREPARED_REVISION = "v3.2.0.a"

# pg_advisory_xact_lock key: "pgjob" in ASCII. Transaction-level, so that it also holds
# behind pgbouncer's transaction pooling.
LOCK_KEY = 0x70676A6F62

_PRESENT = """
select to_regclass('public.version_info') is not null
   and to_regclass('public.alembic_version') is not null
   and to_regclass('public.pgjob_heartbeats') is not null
   and to_regclass('public.pgjob_requests') is not null
"""


def socket_url(socket_dir: Path, port: int, settings: Settings, passfile: Path) -> str:
    return (f"postgresql+psycopg://{quote(settings.user)}@/{quote(settings.database)}"
            f"?host={quote(str(socket_dir))}&port={port}&passfile={quote(str(passfile))}")


def optuna_schema_revision(optuna_dir: Path | None = None) -> str | None:
    """The newest alembic revision of the installed Optuna, read from its files, or None
    when it cannot be told."""
    if optuna_dir is None:
        import optuna

        optuna_dir = Path(optuna.__file__).parent
    versions = optuna_dir / "storages" / "_rdb" / "alembic" / "versions"
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


def ensure_tables(engine, extra_ddl: tuple[str, ...]) -> None:
    """Create Optuna's tables (if there are none) and pgjob's (`extra_ddl`), once, whoever
    else starts at the same moment. `engine` is a SQLAlchemy engine on the study database,
    connected as the application role, which so owns every table."""
    with engine.connect() as conn:
        if conn.exec_driver_sql(_PRESENT).scalar():
            conn.rollback()
            return
        conn.rollback()
    with engine.begin() as conn:
        conn.exec_driver_sql(f"select pg_advisory_xact_lock({LOCK_KEY})")
        if conn.exec_driver_sql("select to_regclass('public.version_info') is null").scalar():
            _create_optuna_tables(conn)
        for ddl in extra_ddl:
            conn.exec_driver_sql(ddl)


def _create_optuna_tables(conn) -> None:
    import optuna
    from optuna.storages._rdb import models

    head = optuna_schema_revision()
    if head == PREPARED_REVISION:
        with conn.connection.dbapi_connection.cursor() as cur:
            cur.execute(PREPARED.read_text())  # several statements: no parameters
        conn.exec_driver_sql("set local search_path to default")
    else:
        models.BaseModel.metadata.create_all(conn)
        _stamp(conn)
    conn.exec_driver_sql(
        "insert into version_info (version_info_id, schema_version, library_version) "
        "values (1, %(schema)s, %(version)s)",
        {"schema": models.SCHEMA_VERSION, "version": optuna.__version__})


def _stamp(conn) -> None:
    """Record the schema's alembic revision, as Optuna does for the tables it creates."""
    import optuna
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location",
                           str(Path(optuna.__file__).parent / "storages" / "_rdb" / "alembic"))
    MigrationContext.configure(conn).stamp(ScriptDirectory.from_config(config), "head")


# Where each kind of home keeps its studies (home.STORAGES): the first table that a study
# of that kind writes a row to.
STUDY_TABLES = {"rdb": "studies", "journal": "pgjob_journal"}


def kinds_in_use(fetch) -> list[str]:
    """The storage kinds whose tables hold studies; `fetch(sql)` returns one row."""
    names = list(STUDY_TABLES)
    there = fetch("select " + ", ".join(f"to_regclass('public.{STUDY_TABLES[k]}') is not null"
                                        for k in names))
    return [k for k, present in zip(names, there) if present and
            fetch(f"select exists (select 1 from {STUDY_TABLES[k]})")[0]]


def kind_of_studies(in_use: list[str], setting: str) -> str:
    """The kind whose studies the server's sweep and `pgjob status` look at: the one the
    database holds (workers may run with another PGJOB_STORAGE than serve or the person
    asking), else the home's setting (no studies yet, or, wrongly, both kinds)."""
    return in_use[0] if len(in_use) == 1 else setting


def check_kind(fetch, home) -> None:
    """Refuse to open one kind of storage on a database whose studies are of the other:
    a worker with another PGJOB_STORAGE than the rest, or a home whose setting changed
    after its studies began, would otherwise start an empty study beside them."""
    from .errors import UsageError

    wanted = home.settings().storage
    others = [k for k in kinds_in_use(fetch) if k != wanted]
    if others:
        raise UsageError(
            f"the home {home.path} is set to storage = {wanted!r}, but its database holds "
            f"{others[0]!r} studies, which this storage would not see. Use the setting the "
            f"studies were made with (pgjob.toml, or PGJOB_STORAGE, the same for every "
            f"worker), or move them with `pgjob export` and `pgjob import`")
