"""Shared fixtures: real PostgreSQL homes and real `pgjob serve` processes.

Servers listen on loopback only (--allow 127.0.0.1/32, --host 127.0.0.1). PostgreSQL refuses
root, so these tests run as an unprivileged user (`./dev test` arranges that when started as
root); tests marked `root` are the ones that check pgjob's own handling of root.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from psycopg import sql

from pgjob import binaries, endpoint
from pgjob.home import open_home
from pgjob.initialize import init

IS_ROOT = os.geteuid() == 0
LOOPBACK = ("--host", "127.0.0.1")
PG_FIXTURES = {"server", "home_path", "template_home", "fast_server", "journal_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        needs_pg = "pg" in marks or PG_FIXTURES & set(item.fixturenames)
        if IS_ROOT and "root" not in marks and needs_pg:
            item.add_marker(pytest.mark.skip(
                reason="PostgreSQL refuses root: run the suite through `./dev test`, which "
                       "runs it as an unprivileged user"))
        if not IS_ROOT and "root" in marks:
            item.add_marker(pytest.mark.skip(reason="checks pgjob started as root"))


def pgjob_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgjob", *args]


def run_pgjob(*args: str, timeout: float = 120, env: dict | None = None,
              check: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run(pgjob_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and done.returncode != 0:
        raise AssertionError(f"pgjob {' '.join(args)} failed ({done.returncode}):\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def trial_states(found, study: str) -> dict[str, int]:
    """{state: count} of a study's trials; {} before the first worker made Optuna's tables
    (pgjob init makes none)."""
    with found.connect() as conn:
        if not conn.execute("select to_regclass('trials') is not null").fetchone()[0]:
            return {}
        return dict(conn.execute(
            "select t.state::text, count(*) from trials t join studies s using (study_id) "
            "where s.study_name = %s group by 1", (study,)).fetchall())


def skip_unless_ci(reason: str) -> None:
    """Skip for a missing part of the test rig; with CI=true, where `./dev test` provides
    all of it, a missing part is a failure, never a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster() -> dict:
    """The Slurm test cluster's facts (tests/cluster/up.sh writes them); with CI=true a
    missing cluster is a failure, never a skip."""
    env_file = Path("/run/pgjob-testcluster/env")
    if not env_file.exists():
        skip_unless_ci("no Slurm test cluster is up (tests/cluster/up.sh needs root; "
                       "`./dev test` as root starts it)")
    return dict(line.split("=", 1) for line in env_file.read_text().split() if "=" in line)


@pytest.fixture
def no_system_postgresql(monkeypatch, tmp_path):
    """Hide every place but the pip build: no PATH entries, no distribution folders."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.delenv("PGJOB_PG_BIN", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv(binaries.SEARCH_ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return {"PATH": str(empty), binaries.SEARCH_ENV: "", "XDG_CACHE_HOME": str(tmp_path / "cache")}


@pytest.fixture(scope="session")
def template_home(tmp_path_factory) -> Path:
    """One initialized home per session; tests get copies (initdb is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "home"
    init(path, allow=("127.0.0.1/32",), workers=8)
    return path


@pytest.fixture
def home_path(template_home, tmp_path) -> Path:
    path = tmp_path / "home"
    shutil.copytree(template_home, path, symlinks=True)
    return path


class Served:
    """A `pgjob serve` running in the background for one test (stopped after it, always)."""

    started: list["Served"] = []

    def __init__(self, home: Path, log: Path, *extra: str, env: dict | None = None) -> None:
        self.home_path = home
        self.home = open_home(home)
        self.log = log
        with open(log, "a") as out:
            self.process = subprocess.Popen(
                pgjob_cmd("serve", "--home", str(home), *LOOPBACK, "--health-interval", "0.5",
                          *extra), stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})})
        Served.started.append(self)

    def endpoint(self, timeout: float = 60) -> endpoint.Endpoint:
        try:
            return endpoint.wait_connectable(self.home, timeout=timeout)
        except Exception:
            raise AssertionError(f"server did not come up; serve log:\n{self.log.read_text()}")

    def postmaster(self) -> psutil.Process:
        return psutil.Process(self.endpoint().pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


@pytest.fixture(autouse=True)
def _no_server_outlives_its_test():
    yield
    while Served.started:
        served = Served.started.pop()
        if served.process.poll() is None:
            served.process.terminate()
            served.process.wait(60)


@pytest.fixture
def server(home_path, tmp_path):
    served = Served(home_path, tmp_path / "serve.log")
    served.endpoint()
    yield served
    if served.process.poll() is None:
        served.stop()
    served.process.wait(60)


def set_settings(home: Path, **changes) -> None:
    """Write `changes` into the home's pgjob.toml; serve and workers read it when they start."""
    opened = open_home(home)
    opened.save_settings(dataclasses.replace(opened.settings(), **changes))


FAST = {"heartbeat_interval": 1, "grace_period": 3}


@pytest.fixture(scope="module")
def fast_server(template_home, tmp_path_factory):
    """One `pgjob serve` for a whole module, on a home whose pgjob.toml sets 1 s heartbeats
    and a 3 s grace period (FAST), so that the server judges trials within seconds. Tests
    sharing it use studies of their own names."""
    yield from _module_server(template_home, tmp_path_factory, "fast", **FAST)


@pytest.fixture(scope="module")
def journal_server(template_home, tmp_path_factory):
    """As fast_server, on a journal home (storage = "journal"): `pgjob.optuna_storage()`
    there is Optuna's JournalStorage with its logs in the server."""
    yield from _module_server(template_home, tmp_path_factory, "journal", storage="journal",
                              **FAST)


def _module_server(template_home, tmp_path_factory, name: str, **settings):
    """A `pgjob serve` on a copy of the template home with `settings`, for a whole module."""
    base = tmp_path_factory.mktemp(name)
    path = base / "home"
    shutil.copytree(template_home, path, symlinks=True)
    set_settings(path, **settings)
    served = Served(path, base / "serve.log")
    Served.started.remove(served)  # it outlives each test: stopped below, after the module
    try:
        served.endpoint()
        yield served
    finally:
        if served.process.poll() is None:
            served.stop()
        served.process.wait(60)


def drop_optuna_schema(found: endpoint.Endpoint) -> None:
    """Drop every Optuna table and type from the study database, as the application role
    (their owner), leaving pgjob's own (pgjob_*): the database as a fresh home has it, before
    its first client, for tests that share one server between several first clients.
    """
    with found.connect() as conn:
        tables = [t for (t,) in conn.execute(
            "select tablename from pg_tables where schemaname = 'public' "
            "and tableowner = current_user and tablename not like 'pgjob%'")]
        types = [t for (t,) in conn.execute(
            "select t.typname from pg_type t join pg_namespace n on n.oid = t.typnamespace "
            "where n.nspname = 'public' and t.typtype = 'e' "
            "and t.typowner = (select oid from pg_roles where rolname = current_user)")]
        with conn.transaction():
            for name in tables:
                conn.execute(sql.SQL("drop table if exists public.{} cascade")
                             .format(sql.Identifier(name)))
            for name in types:
                conn.execute(sql.SQL("drop type if exists public.{}")
                             .format(sql.Identifier(name)))
