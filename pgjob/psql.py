"""`pgjob psql`: an interactive psql on the study database, with no password typed.

psql gets the endpoint through libpq's PG* variables (the passfile and the instance's CA
included), so nothing secret appears on its command line, and it replaces pgjob's process,
so Ctrl-C, the pager and the exit code are psql's own.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import binaries
from .endpoint import Endpoint
from .errors import BinariesNotFound


def find_psql(configured: str = "") -> str:
    """psql next to the home's PostgreSQL programs, else the one on PATH."""
    for place in binaries.candidates(configured):
        candidate = Path(place.directory, "psql")
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("psql")
    if found:
        return found
    raise BinariesNotFound(
        "no psql found (looked next to PostgreSQL's server programs and on PATH); "
        "`module load postgresql`, or as root `apt-get install postgresql-client` / "
        "`dnf install postgresql`")


def exec_psql(found: Endpoint, extra: tuple[str, ...], *, pg_bin: str = "",
              sslmode: str | None = None) -> None:
    """Replace this process with psql connected to `found` (never returns)."""
    program = find_psql(pg_bin)
    env = {**os.environ, **(found.libpq_env(sslmode) if sslmode else found.libpq_env()),
           "PGAPPNAME": "pgjob psql"}
    os.execve(program, [program, *extra], env)
