"""Finding PostgreSQL's server programs, and saying where we looked when we cannot."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

from .errors import BinariesNotFound

PROGRAMS = ("initdb", "postgres", "pg_controldata")
SEARCH_PATTERNS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin")


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


def candidates(configured: str = "") -> list[tuple[str, str]]:
    """Every place we look, in order, as (where it came from, directory)."""
    places: list[tuple[str, str]] = []
    if configured:
        places.append(("--pg-bin / PGJOB_PG_BIN", configured))
    bindir = _pg_config_bindir()
    if bindir:
        places.append(("pg_config --bindir", bindir))
    initdb = shutil.which("initdb")
    if initdb:
        places.append(("initdb on PATH", str(Path(initdb).resolve().parent)))
    for pattern in SEARCH_PATTERNS:
        for found in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            places.append((pattern, found))
    return places


def has_programs(directory: str) -> bool:
    return all(os.access(Path(directory, p), os.X_OK) for p in PROGRAMS)


def find(configured: str = "") -> Path:
    """The directory holding initdb, postgres and pg_controldata.

    A configured directory that lacks them is an error of its own: silently using another
    PostgreSQL than the one asked for would be worse.
    """
    places = candidates(configured)
    if configured and not has_programs(configured):
        raise BinariesNotFound(
            f"no PostgreSQL server programs ({', '.join(PROGRAMS)}) in {configured}, "
            "which --pg-bin or PGJOB_PG_BIN names; point it at the folder that holds initdb")
    for _, directory in places:
        if has_programs(directory):
            return Path(directory)
    looked = "\n".join(f"  {d}  ({origin})" for origin, d in places) or "  (nothing found)"
    raise BinariesNotFound(
        "no PostgreSQL server programs found (initdb, postgres, pg_controldata).",
        detail=("Looked in: --pg-bin/PGJOB_PG_BIN, pg_config --bindir, initdb on PATH, "
                "/usr/lib/postgresql/*/bin, /usr/pgsql-*/bin:\n" + looked + "\n"
                "To get PostgreSQL: `module load postgresql` on a cluster with modules; "
                "`conda install -c conda-forge postgresql`; or as root "
                "`apt-get install postgresql` / `dnf install postgresql-server`. "
                "Then run again, or name the folder with --pg-bin DIR."))
