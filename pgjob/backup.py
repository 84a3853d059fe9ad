"""Backups of the study database: pg_dump into the home, rotated; pg_restore into a new home.

A dump holds every study, so it is kept like a secret: pg_dump writes into a file that
pgjob created exclusively, 0600 from its first byte, under a name nobody can guess (also in
a folder others can write, such as /tmp), and it gets its final name only once it is
complete and on disk.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from . import proc
from .errors import PgJobError
from .home import Home, fsync_folder
from .tls import SSLMODE

SUFFIX = ".dump"

log = logging.getLogger("pgjob.backup")


def conninfo(home: Home, *, host: str, port: int) -> str:
    """Over TCP, verified TLS as every client uses; over the Unix socket TLS does not apply.

    Built from keywords, so any path or name (a quote, a space) reaches libpq intact."""
    settings = home.settings()
    return make_conninfo(host=host, port=port, dbname=settings.database, user=settings.user,
                         passfile=str(home.app_passfile), sslmode=SSLMODE,
                         sslrootcert=str(home.ca_cert))


def dump(home: Home, bindir: Path, *, host: str, port: int, out_dir: Path | None = None,
         keep: int | None = None, timeout: float = 3600) -> Path:
    """A custom-format pg_dump of the study database, written into `out_dir` (default: the
    home's backups folder, where the oldest beyond `keep` are then removed)."""
    settings = home.settings()
    rotated = out_dir is None or Path(out_dir) == home.backups
    folder = home.backups if rotated else Path(out_dir)
    _ensure_folder(home, folder, in_home=rotated)
    final = folder / f"{settings.database}-{_stamp()}{SUFFIX}"
    _write_dump(home, bindir, final, host=host, port=port, timeout=timeout)
    if rotated:
        rotate(folder, keep if keep is not None else settings.backups_keep, newest=final)
    return final


def _stamp() -> str:
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now % 1 * 1000):03d}"


def _ensure_folder(home: Home, folder: Path, *, in_home: bool) -> None:
    """The home's backups folder is the home's own (0700); a missing --out folder is made
    0700; an existing one is used as it is: the dump is private whatever the folder."""
    try:
        if in_home:
            home.mkdir(folder)
        else:
            folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise PgJobError(f"cannot create the backup folder {folder}: {exc.strerror}; "
                         "choose an --out folder whose parent exists and is yours") from None


def _write_dump(home: Home, bindir: Path, final: Path, *, host: str, port: int,
                timeout: float) -> None:
    """pg_dump into a file only we can read from the moment it exists (mkstemp: O_EXCL,
    0600, a random name, no link followed), fsynced, then renamed to `final`.

    pg_dump writes into the descriptor we opened rather than opening a path itself, so
    whatever someone else puts in the folder meanwhile is never written to. A dump cut
    short (an error, a job's end) keeps its temporary name and is removed.
    """
    folder = final.parent
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{final.name}.", suffix=".partial")
    except OSError as exc:
        raise _not_written(folder, exc) from None
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            proc.run([bindir / "pg_dump", "--format=custom",
                      f"--dbname={conninfo(home, host=host, port=port)}"],
                     stdout=out, timeout=timeout, what="pg_dump failed")
            os.fsync(out.fileno())
        os.replace(partial, final)
        fsync_folder(folder)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise _not_written(folder, exc) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _not_written(folder: Path, exc: OSError) -> PgJobError:
    return PgJobError(f"could not write a backup into {folder}: {exc.strerror or exc}; "
                      "make sure it is writable and has room, or choose another --out folder")


def rotate(directory: Path, keep: int, *, newest: Path) -> list[Path]:
    """Remove the dumps in `directory` older than the newest `keep`, but never `newest`,
    the one just written: `keep` 0, a clock set back, or another backup finishing at the
    same time must not leave a `pgjob backup` that said "backup written" with nothing.
    Returns what was removed."""
    dumps = sorted(p for p in directory.glob(f"*{SUFFIX}")
                   if p.is_file() and not p.is_symlink())
    spared = set(dumps[-keep:] if keep > 0 else ()) | {newest}
    removed = []
    for old in dumps:
        if old in spared:
            continue
        try:
            old.unlink(missing_ok=True)
            removed.append(old)
        except OSError as exc:  # the new dump is written: an old one left over is no failure
            log.warning("could not remove the old backup %s: %s", old, exc.strerror)
    return removed


def restore(home: Home, bindir: Path, dump_file: Path, *, host: str, port: int) -> None:
    """Load a dump into the (empty) study database of `home`, owned by its app role."""
    proc.run([bindir / "pg_restore", "--no-owner", "--no-privileges", "--exit-on-error",
              f"--dbname={conninfo(home, host=host, port=port)}",
              str(dump_file)], timeout=3600, what=f"pg_restore of {dump_file} failed")


def adopt_restored(conn: psycopg.Connection, home: Home) -> str:
    """The storage kind of a restored study database, made ready for its new home.

    The kind is the one whose tables hold studies (else, with none yet, the journal if only
    its tables are there). A journal's snapshots are signed with the old home's key, which
    the dump does not hold (it is in the old home's secrets): no worker of the new home
    would load them, each would warn and read the whole journal. They are dropped, and
    workers save new ones, signed with the new home's key."""
    from .schema import STUDY_TABLES, kinds_in_use

    def fetch(query):
        return conn.execute(query).fetchone()

    kinds = kinds_in_use(fetch)
    if len(kinds) == 1:
        kind = kinds[0]
    else:
        journal_only = fetch(f"select to_regclass('public.{STUDY_TABLES['journal']}') is not "
                             f"null and to_regclass('public.{STUDY_TABLES['rdb']}') is null")
        kind = "journal" if not kinds and journal_only[0] else "rdb"
        if kinds:
            log.warning("the backup holds both rdb and journal studies; the new home %s is "
                        "set to storage = \"rdb\" (set \"journal\" in its pgjob.toml for "
                        "the others)", home.path)
    if fetch("select to_regclass('public.pgjob_journal_snapshots') is not null")[0]:
        conn.execute("delete from pgjob_journal_snapshots")
    return kind
