"""A pytest plugin that points Optuna's own storage tests at pgjob's server.

Loaded with `-p pgjob_optuna_plugin` into a pytest run of the tests from Optuna's sdist
(see optuna_suite.py). At import, before Optuna's test modules are collected, it replaces
the storage modes those tests are parametrized with, and teaches Optuna's StorageSupplier
to make them:

- PGJOB_CONFORMANCE_MODES=pgjob: "pgjob" is `pgjob.optuna_storage(home, **extra_args)`,
  "cached_pgjob" the same inside Optuna's _CachedStorage (what a study wraps it in);
- PGJOB_CONFORMANCE_MODES=control: "rdb" and "cached_rdb" are a plain RDBStorage on the
  server's URL (`pgjob url`): the control, what Optuna's tests expect of any storage on
  such a server, so that a failure only with pgjob's storage is pgjob's.

PGJOB_CONFORMANCE_HOMES lists homes (os.pathsep between them) whose servers are running.
A supplier opened while another is open (test_copy_study copies between two) takes a
home not in use, so every open storage has a study database of its own. Optuna's tests
expect each new storage to be empty, so a supplier first empties its database's tables
(keeping the schema's version rows). Tests that get none of our modes are deselected.
"""
from __future__ import annotations

import os
import subprocess
import sys

import psycopg

import optuna
from optuna.testing import storages as optuna_test_storages

MODES = {"pgjob": ["pgjob", "cached_pgjob"], "control": ["rdb", "cached_rdb"]}

# One statement, one round trip. The tables are whatever this Optuna (and pgjob) made, so
# the server lists them, and they are emptied children first (each after every table that
# references it); the two kept hold the schema's revision, not study data. DELETE, not
# TRUNCATE: on these small tables it takes 4 ms where TRUNCATE, which makes new files for
# every table and index, took 200 ms (per test, of hundreds). The sequences go on, so no
# id comes back: a heartbeat thread that an earlier test's storage left running can
# never write for a later test's trial.
EMPTY_TABLES = """
do $$
declare t regclass;
begin
  for t in
    with recursive refs as (
      select conrelid::regclass as child, confrelid::regclass as parent from pg_constraint
       where contype = 'f' and connamespace = 'public'::regnamespace and conrelid <> confrelid),
    below(tbl, depth) as (
      select oid::regclass, 0 from pg_class
       where relnamespace = 'public'::regnamespace and relkind in ('r', 'p')
         and relname not in ('alembic_version', 'version_info')
      union all
      select refs.parent, below.depth + 1 from below join refs on refs.child = below.tbl
       where below.depth < 50)
    select tbl from below group by tbl order by max(depth)
  loop
    execute format('delete from %s', t);
  end loop;
end $$
"""


def _setting(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise RuntimeError(f"{name} is not set: this plugin runs inside "
                           "tests/test_optuna_conformance.py, which sets it")
    return value


def _url(home: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pgjob", "url", "--format", "sqlalchemy",
                           "--home", home, "--wait", "60"],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"`pgjob url --home {home}` failed: {done.stderr.strip()}")
    return done.stdout.strip()


class Database:
    """One served home: its URL, and a connection kept open to empty its tables."""

    def __init__(self, home: str) -> None:
        self.home = home
        self.url = _url(home)
        self.conn: psycopg.Connection | None = None

    def empty(self) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.url.replace("postgresql+psycopg://",
                                                         "postgresql://", 1), autocommit=True)
            # A storage left idle in a transaction would block the delete for ever; fail
            # the test instead, naming the wait.
            self.conn.execute("set lock_timeout = '30s'")
        self.conn.execute(EMPTY_TABLES)


ACTIVE = _setting("PGJOB_CONFORMANCE_MODES")
if ACTIVE not in MODES:
    raise RuntimeError(f"PGJOB_CONFORMANCE_MODES={ACTIVE!r}: use one of {sorted(MODES)}")
DATABASES = [Database(home) for home in _setting("PGJOB_CONFORMANCE_HOMES").split(os.pathsep)]
_open: dict[object, Database] = {}  # our suppliers open now, and their databases

optuna_test_storages.STORAGE_MODES[:] = MODES[ACTIVE]
optuna_test_storages.STORAGE_MODES_HEARTBEAT[:] = MODES[ACTIVE]

_optuna_enter = optuna_test_storages.StorageSupplier.__enter__
_optuna_exit = optuna_test_storages.StorageSupplier.__exit__


def _make(mode: str, database: Database, extra_args: dict):
    if mode in ("pgjob", "cached_pgjob"):
        import pgjob

        storage = pgjob.optuna_storage(database.home, **extra_args)
    else:
        storage = optuna.storages.RDBStorage(database.url, **extra_args)
    return optuna.storages._CachedStorage(storage) if mode.startswith("cached_") else storage


def _enter(self):
    if self.storage_specifier not in MODES[ACTIVE]:
        return _optuna_enter(self)  # Optuna's own modes, for tests that name one ("sqlite")
    free = [d for d in DATABASES if all(d is not used for used in _open.values())]
    if not free:
        raise RuntimeError(f"{len(_open) + 1} storages open at once, but only "
                           f"{len(DATABASES)} servers in PGJOB_CONFORMANCE_HOMES")
    free[0].empty()
    _open[self] = free[0]
    try:
        self.storage = _make(self.storage_specifier, free[0], self.extra_args)
    except BaseException:
        del _open[self]
        raise
    return self.storage


def _exit(self, exc_type, exc_val, exc_tb):
    try:
        # Optuna's own exit disposes of an RDBStorage's engine, also inside _CachedStorage.
        return _optuna_exit(self, exc_type, exc_val, exc_tb)
    finally:
        _open.pop(self, None)


optuna_test_storages.StorageSupplier.__enter__ = _enter
optuna_test_storages.StorageSupplier.__exit__ = _exit


def pytest_unconfigure(config):
    for database in DATABASES:
        if database.conn is not None:
            database.conn.close()


def pytest_report_header(config):
    return (f"pgjob conformance: storage modes {MODES[ACTIVE]} on "
            f"{', '.join(d.home for d in DATABASES)}")


def _gets_our_storage(item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(
        isinstance(v, str) and v in MODES[ACTIVE] for v in callspec.params.values())


def pytest_collection_modifyitems(config, items):
    """Keep only the tests parametrized with our modes: the others use Optuna's own
    storages (sqlite, journal, in-memory) whatever the mode set, so they would pass or
    fail alike in both runs and only cost time."""
    kept = [item for item in items if _gets_our_storage(item)]
    config.hook.pytest_deselected(items=[item for item in items if not _gets_our_storage(item)])
    items[:] = kept
