"""Passwords: generated, kept only in 0600 passfiles, set as SCRAM verifiers, rotated.

A rotation never leaves a password that only the server knows: the new one is first
written, fsynced, to its own file (secrets/app.pgpass.pending, created exclusively, 0600),
then set on the server, then renamed over app.pgpass. Cut short between the last two
steps (a crash, a job's end, a full disk), it leaves the pending file, and
`finish_rotation` (run by the next `pgjob rotate-password`, `pgjob init` and `pgjob serve`) keeps
whichever of the two passwords the server accepts.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from . import endpoint
from .cluster import connect
from .errors import PgJobError, first_line
from .home import Home, fsync_folder
from .settings import Settings

# A pending file younger than this, whose password the server does not accept (yet), may
# belong to a rotation under way right now (between writing it and ALTER ROLE), so it is
# not dropped; that takes a connection and one statement, far less than this.
STALE_AFTER = 60.0

# A probe tries a passfile against the server: None when it authenticates, else why not.
Probe = Callable[[Path], "str | None"]


def generate() -> str:
    return secrets.token_urlsafe(32)


def passfile_line(user: str, password: str) -> str:
    return f"*:*:*:{user}:{password}\n"


def set_password(conn: psycopg.Connection, user: str, password: str) -> None:
    """ALTER ROLE with a SCRAM verifier computed here: the plain text never reaches the
    server, its log, or pg_stat_activity."""
    verifier = conn.pgconn.encrypt_password(password.encode(), user.encode(),
                                            b"scram-sha-256").decode()
    conn.execute(sql.SQL("alter role {} password {}").format(sql.Identifier(user),
                                                             sql.Literal(verifier)))


def rotate(home: Home) -> None:
    """A new application password: on disk, then on the running server, then in app.pgpass.

    Sessions already open keep working; a worker that connects in the moment between the
    last two steps is refused once and retries (pgjob's storage does that by itself). A
    failure at any step leaves one password that both the server and app.pgpass know.
    """
    published = endpoint.read(home)
    if published is not None and home.pending_passfile.exists():
        finish_rotation(home, endpoint_probe(home, published))
    found = endpoint.wait_connectable(home, timeout=0)
    password = generate()
    line = passfile_line(found.user, password)
    _write_pending(home, line)
    try:
        with found.connect() as conn:  # a role may change its own password
            set_password(conn, found.user, password)
    except psycopg.Error as exc:
        _after_failed_alter(home, found, exc)
    try:
        _promote(home)
    except PgJobError:
        if _holds(home.app_passfile, line):  # an init running meanwhile promoted it for us
            return
        raise


def _holds(passfile: Path, line: str) -> bool:
    try:
        return passfile.read_text() == line
    except OSError:
        return False


def _after_failed_alter(home: Home, found: endpoint.Endpoint, exc: psycopg.Error) -> None:
    """ALTER ROLE failed: the old password is still the server's, unless the connection
    broke after the server committed it, which only asking the server can tell."""
    why = first_line(exc)
    if exc.sqlstate is None:  # no answer from the server: it may have set the password
        if finish_rotation(home, endpoint_probe(home, found), ours=True) == "promoted":
            return
    home.pending_passfile.unlink(missing_ok=True)
    raise PgJobError(f"the server did not take the new password ({why}); nothing changed, "
                     "the old password still works. Try `pgjob rotate-password` again")


def _write_pending(home: Home, line: str) -> None:
    """The new password, durable on disk before the server knows it: created exclusively
    (O_EXCL, no link followed), 0600 from the start, fsynced with its folder."""
    pending = home.pending_passfile
    try:
        fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise PgJobError(f"another password rotation of {home.path} is under way "
                         f"({pending} exists); wait for it, then try again") from None
    except OSError as exc:
        raise _not_written(home, exc) from None
    try:
        with os.fdopen(fd, "w") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())
        fsync_folder(home.secrets)
    except OSError as exc:
        pending.unlink(missing_ok=True)
        raise _not_written(home, exc) from None


def _not_written(home: Home, exc: OSError) -> PgJobError:
    return PgJobError(f"could not write the new password into {home.secrets} "
                      f"({exc.strerror or exc}); nothing changed, the old password still "
                      f"works. Make {home.secrets} writable or free space, then try again")


def _promote(home: Home) -> None:
    """The pending password becomes app.pgpass, in one rename (serve's pgbouncer sees the
    passfile's new mtime and takes it)."""
    try:
        os.replace(home.pending_passfile, home.app_passfile)
        fsync_folder(home.secrets)
    except OSError as exc:
        raise PgJobError(
            f"the server has the new password, but it could not be moved into "
            f"{home.app_passfile} ({exc.strerror or exc}); it is kept in "
            f"{home.pending_passfile}. Fix that, then run `pgjob rotate-password` or "
            f"`pgjob init --home {home.path}`, which finish the rotation") from None


def finish_rotation(home: Home, probe: Probe, *, ours: bool = False) -> str:
    """Settle a rotation that was cut short: promote the pending password if the server
    accepts it, else drop it if the server accepts the current one.

    Returns "promoted", "dropped", or "" when nothing was pending. A young pending file
    is dropped only when `ours` (this process wrote it): it may be another rotation's,
    right now between writing it and ALTER ROLE. When the server accepts neither, the
    pending file is kept and the error says how to finish later.
    """
    pending = home.pending_passfile
    if not pending.exists():
        return ""
    refused_new = probe(pending)
    if refused_new is None:
        _promote(home)
        return "promoted"
    refused_old = probe(home.app_passfile)
    if refused_old is None:
        if not ours and _age(pending) < STALE_AFTER:
            raise PgJobError(f"another password rotation of {home.path} is under way "
                             f"({pending} was written just now); wait a minute, then "
                             "try again")
        pending.unlink(missing_ok=True)
        return "dropped"
    raise PgJobError(
        f"a password rotation of {home.path} was cut short, and the server accepts neither "
        f"the new password ({refused_new}) nor the old one ({refused_old}). The new one is "
        f"kept in {pending}: run `pgjob rotate-password` again once the server answers, or "
        f"`pgjob init --home {home.path}` once it has stopped")


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def endpoint_probe(home: Home, found: endpoint.Endpoint) -> Probe:
    """Passfiles tried against the published server, over TCP and TLS as workers connect.

    Not through pgbouncer: it checks a client's password against its own copy of
    app.pgpass and may hand an old client a server connection already open, so it says
    nothing about which password the server has.
    """
    if found.pooler:
        raise PgJobError(
            f"a password rotation of {home.path} was cut short ({home.pending_passfile} is "
            "left), and with pgbouncer in front of the server pgjob cannot tell from here "
            "which password the server has: stop the server (`pgjob stop --wait 120`), then "
            f"run `pgjob init --home {home.path}`, which settles it")
    return lambda passfile: endpoint.check(dataclasses.replace(found, passfile=str(passfile)))


def socket_probe(socket_dir: Path, port: int, settings: Settings) -> Probe:
    """Passfiles tried as the application role over a server's private Unix socket."""
    def probe(passfile: Path) -> str | None:
        try:
            with connect(host=str(socket_dir), port=port, user=settings.user,
                         dbname=settings.database, passfile=passfile) as conn:
                conn.execute("select 1")
            return None
        except psycopg.Error as exc:
            return first_line(exc)
    return probe
