"""Backups of the study database: pg_dump into the home, rotated; pg_restore into a new home."""
from __future__ import annotations

import os
import time
from pathlib import Path

from . import proc
from .home import Home
from .tls import SSLMODE

SUFFIX = ".dump"


def conninfo(home: Home, *, host: str, port: int) -> str:
    """Over TCP, verified TLS as every client uses; over the Unix socket TLS does not apply."""
    settings = home.settings()
    return (f"host='{host}' port={port} dbname='{settings.database}' user='{settings.user}' "
            f"passfile='{home.app_passfile}' sslmode={SSLMODE} "
            f"sslrootcert='{home.secrets / 'ca.crt'}'")


def dump(home: Home, bindir: Path, *, host: str, port: int, out_dir: Path | None = None,
         keep: int | None = None, timeout: float = 3600) -> Path:
    """A custom-format pg_dump of the study database; the oldest beyond `keep` are removed.

    Written under a temporary name and renamed when complete, so a dump cut short by a
    job's end never looks like a backup.
    """
    settings = home.settings()
    out_dir = out_dir or home.backups
    if out_dir == home.backups:
        home.mkdir(out_dir)
    now = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now % 1 * 1000):03d}"
    final = out_dir / f"{settings.database}-{stamp}{SUFFIX}"
    partial = out_dir / f".{final.name}.partial"
    try:
        proc.run([bindir / "pg_dump", "--format=custom", f"--file={partial}",
                  f"--dbname={conninfo(home, host=host, port=port)}"],
                 timeout=timeout, what="pg_dump failed")
        os.chmod(partial, 0o600)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    if out_dir == home.backups:
        rotate(out_dir, keep if keep is not None else settings.backups_keep)
    return final


def rotate(directory: Path, keep: int) -> None:
    dumps = sorted(directory.glob(f"*{SUFFIX}"))
    for old in dumps[:max(0, len(dumps) - keep)]:
        old.unlink(missing_ok=True)


def restore(home: Home, bindir: Path, dump_file: Path, *, host: str, port: int) -> None:
    """Load a dump into the (empty) study database of `home`, owned by its app role."""
    proc.run([bindir / "pg_restore", "--no-owner", "--no-privileges", "--exit-on-error",
              f"--dbname={conninfo(home, host=host, port=port)}",
              str(dump_file)], timeout=3600, what=f"pg_restore of {dump_file} failed")


def restore_new_home(dump_file: Path, home_option, **init_options) -> Home:
    """A new home made by `pgjob init`, with the study database loaded from `dump_file`."""
    from .home import resolve_path
    from .initialize import init, temporary_server
    from .errors import UsageError

    dump_file = Path(dump_file).absolute()
    if not dump_file.is_file():
        raise UsageError(f"no backup file at {dump_file}")
    target = resolve_path(home_option)
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"{target} exists and is not empty: restore goes into a new home. "
                         "Choose a --home that does not exist yet")
    result = init(target, with_schema=False, **init_options)  # the dump brings its tables
    home, settings = result.home, result.settings
    with temporary_server(home, settings, Path(settings.pg_bin)) as server:
        restore(home, Path(settings.pg_bin), dump_file, host=str(server.socket_dir),
                port=server.port)
    return home
