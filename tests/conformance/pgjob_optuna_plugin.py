"""A pytest plugin that points Optuna's own storage tests at pgjob's server.

Loaded with `-p pgjob_optuna_plugin` into a pytest run of the tests from Optuna's sdist
(see optuna_suite.py). At import, before Optuna's test modules are collected, it replaces
the storage modes those tests are parametrized with, and teaches Optuna's StorageSupplier
to make them. PGJOB_CONFORMANCE_MODES names the mode set:

- pgjob: "pgjob" is `pgjob.optuna_storage(home, **extra_args)` on an rdb home,
  "cached_pgjob" the same inside Optuna's _CachedStorage (what a study wraps it in);
- control: "rdb" and "cached_rdb" are a plain RDBStorage on the server's URL (`pgjob
  url`): the control, what Optuna's tests expect of any storage on such a server, so
  that a failure only with pgjob's storage is pgjob's;
- pgjob_journal: "pgjob_journal" is `pgjob.optuna_storage(home)` on a journal home
  (Optuna's JournalStorage on pgjob's backend, journal.py);
- journal: "journal" is Optuna's own, a JournalStorage on a JournalFileBackend in a
  temporary file: the journal runs' control, which needs no server.

Optuna's journal_tests test backends directly, parametrized over a list of their own
(LOG_STORAGE_WITH_PARAMETER); the journal mode sets add their mode to it, so its backend
tests run on PgJournalBackend and, as their control, on a JournalFileBackend.

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
import pytest

import optuna
from optuna.testing import storages as optuna_test_storages
from optuna.testing.tempfile_pool import NamedTemporaryFilePool

MODES = {"pgjob": ["pgjob", "cached_pgjob"], "control": ["rdb", "cached_rdb"],
         "pgjob_journal": ["pgjob_journal"], "journal": ["journal"]}
# Optuna's JournalStorage has no heartbeat (its heartbeat tests are for RDBStorage only):
# the journal mode sets have none, so those tests are deselected there.
HEARTBEAT_MODES = {"pgjob": MODES["pgjob"], "control": MODES["control"],
                   "pgjob_journal": [], "journal": []}

# One statement, one round trip. The tables are whatever this Optuna (and pgjob) made, so
# the server lists them, and they are emptied children first (each after every table that
# references it); the two kept hold the schema's revision, not study data. DELETE, not
# TRUNCATE: on these small tables it takes 4 ms where TRUNCATE, which makes new files for
# every table and index, took 200 ms (per test, of hundreds). The sequences go on, so no
# id comes back: a heartbeat thread that an earlier test's storage left running can
# never write for a later test's trial. A journal's counter row stays and starts again
# at 0, since a new JournalStorage replays the journal from log 0.
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
         and relname not in ('alembic_version', 'version_info', 'pgjob_journal_head')
      union all
      select refs.parent, below.depth + 1 from below join refs on refs.child = below.tbl
       where below.depth < 50)
    select tbl from below group by tbl order by max(depth)
  loop
    execute format('delete from %s', t);
  end loop;
  if to_regclass('public.pgjob_journal_head') is not null then
    update pgjob_journal_head set next = 0;
  end if;
end $$
"""


def _setting(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise RuntimeError(f"{name} is not set: this plugin runs inside "
                           "tests/test_optuna_conformance.py, which sets it")
    return value


def _url(home: str) -> str:
    # libpq's form: `pgjob url` refuses the Optuna URL of a journal home
    done = subprocess.run([sys.executable, "-m", "pgjob", "url", "--format", "libpq",
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

    @property
    def sqlalchemy_url(self) -> str:
        return self.url.replace("postgresql://", "postgresql+psycopg://", 1)

    def empty(self) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.url, autocommit=True)
            # A storage left idle in a transaction would block the delete for ever; fail
            # the test instead, naming the wait.
            self.conn.execute("set lock_timeout = '30s'")
        self.conn.execute(EMPTY_TABLES)


ACTIVE = _setting("PGJOB_CONFORMANCE_MODES")
if ACTIVE not in MODES:
    raise RuntimeError(f"PGJOB_CONFORMANCE_MODES={ACTIVE!r}: use one of {sorted(MODES)}")
# The journal's control is a file: it needs no server
DATABASES = [] if ACTIVE == "journal" else [
    Database(home) for home in _setting("PGJOB_CONFORMANCE_HOMES").split(os.pathsep)]
_open: dict[object, Database] = {}  # our suppliers open now, and their databases

optuna_test_storages.STORAGE_MODES[:] = MODES[ACTIVE]
optuna_test_storages.STORAGE_MODES_HEARTBEAT[:] = HEARTBEAT_MODES[ACTIVE]

_optuna_enter = optuna_test_storages.StorageSupplier.__enter__
_optuna_exit = optuna_test_storages.StorageSupplier.__exit__


def _make(mode: str, database: Database, extra_args: dict):
    if mode in ("pgjob", "cached_pgjob", "pgjob_journal"):
        import pgjob

        storage = pgjob.optuna_storage(database.home, **extra_args)
    else:
        storage = optuna.storages.RDBStorage(database.sqlalchemy_url, **extra_args)
    return optuna.storages._CachedStorage(storage) if mode.startswith("cached_") else storage


def _claim(owner) -> Database:
    """An emptied database that no open supplier uses, now `owner`'s."""
    free = [d for d in DATABASES if all(d is not used for used in _open.values())]
    if not free:
        raise RuntimeError(f"{len(_open) + 1} storages open at once, but only "
                           f"{len(DATABASES)} servers in PGJOB_CONFORMANCE_HOMES")
    free[0].empty()
    _open[owner] = free[0]
    return free[0]


def _enter(self):
    # Optuna's own modes: "sqlite" in tests that name it, and "journal", the journal's control
    if self.storage_specifier not in MODES[ACTIVE] or ACTIVE == "journal":
        return _optuna_enter(self)
    database = _claim(self)
    try:
        self.storage = _make(self.storage_specifier, database, self.extra_args)
    except BaseException:
        del _open[self]
        raise
    return self.storage


def _exit(self, exc_type, exc_val, exc_tb):
    try:
        # Optuna's own exit disposes of an RDBStorage's engine, also inside _CachedStorage,
        # and closes nothing of a JournalStorage: pgjob's journal's connections close here.
        if self.storage_specifier == "pgjob_journal" and self.storage is not None:
            self.storage.pgjob_backend.close()
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
            f"{', '.join(d.home for d in DATABASES) or 'temporary files'}")


# -- Optuna's journal backend tests (tests/storages_tests/journal_tests/test_journal.py) -----

def _backend_enter(self):
    if self.storage_type == "pgjob_journal":
        from pgjob.home import open_home
        from pgjob.journal import PgJournalBackend

        database = _claim(self)
        self.pgjob_backend = PgJournalBackend(open_home(database.home), wait=60)
        return self.pgjob_backend
    if self.storage_type == "journal":  # what the "journal" storage mode has
        self.tempfile = NamedTemporaryFilePool().tempfile()
        return optuna.storages.journal.JournalFileBackend(self.tempfile.name)
    return self._optuna_enter()


def _backend_exit(self, exc_type, exc_val, exc_tb):
    try:
        if getattr(self, "pgjob_backend", None) is not None:
            self.pgjob_backend.close()
        return self._optuna_exit(exc_type, exc_val, exc_tb)
    finally:
        _open.pop(self, None)


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc):
    """Before pytest reads the parametrize marks of test_journal.py (they hold its list
    LOG_STORAGE_WITH_PARAMETER itself), add the journal mode sets' backend to that list
    and teach the module's supplier to make it."""
    module = metafunc.module
    cases = getattr(module, "LOG_STORAGE_WITH_PARAMETER", None)
    if ACTIVE not in ("pgjob_journal", "journal") or cases is None:
        return
    ours = (ACTIVE, None)  # Optuna's own grace period: none (that is the file lock's)
    if ours not in cases:
        cases.append(ours)
        supplier = module.JournalLogStorageSupplier
        supplier._optuna_enter, supplier.__enter__ = supplier.__enter__, _backend_enter
        supplier._optuna_exit, supplier.__exit__ = supplier.__exit__, _backend_exit


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
