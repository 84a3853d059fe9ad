"""Making a home: `pgjob init` (create one, or check and repair an existing one) and
`pgjob restore` (a new home loaded from a backup). Only the CLI calls these; the server's
configuration and the temporary server they work on belong to instance.py."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
from psycopg import sql

from . import backup, binaries, endpoint, instance, lease, passwords, signing, tls
from .cluster import initdb
from .errors import UsageError
from .home import Home, open_home, resolve_path
from .instance import temporary_server
from .settings import Settings, load as load_settings


@dataclass(frozen=True)
class InitResult:
    home: Home
    settings: Settings
    created: bool  # False: an existing home was checked and repaired


def _check_target(home: Home) -> None:
    path = home.path
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} exists and is not a directory; choose another --home")
    if path.is_dir():  # never adopt a folder, or a home, that someone else put there
        home.check_trusted(new=not home.is_home())
    leftovers = {"data", "secrets", "logs", "run"}  # of an init that failed half-way
    if path.is_dir() and not home.is_home() and any(
            p.name not in leftovers for p in path.iterdir()):
        raise UsageError(f"{path} is not empty and is not a pgjob home; refusing to use it. "
                         "Choose an empty or new directory for --home")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK) and not path.exists():
        raise UsageError(f"cannot create {path}: {parent} is not writable by you; "
                         "choose a --home under a directory you own (on the shared filesystem)")


def _create_cluster(home: Home, settings: Settings, bindir: Path) -> None:
    tls.ensure_ca(home)
    signing.ensure_key(home)
    su_password = passwords.generate()
    app_password = passwords.generate()
    home.write(home.superuser_passfile, passwords.passfile_line(settings.superuser, su_password))
    home.write(home.app_passfile, passwords.passfile_line(settings.user, app_password))
    pwfile = home.secrets / "initdb.pw"
    home.write(pwfile, su_password + "\n")
    try:
        initdb(bindir, home.data, superuser=settings.superuser, pwfile=pwfile)
    finally:
        pwfile.unlink(missing_ok=True)
    # initdb's own pg_hba defaults allow more than we promise: start from our block alone.
    (home.data / "pg_hba.conf").unlink()
    instance.write_resting_conf(home, settings)
    _create_role_and_database(home, settings, bindir, app_password)


def _create_role_and_database(home: Home, settings: Settings, bindir: Path,
                              app_password: str) -> None:
    with temporary_server(home, settings, bindir) as server, server.connect() as conn:
        role, db = sql.Identifier(settings.user), sql.Identifier(settings.database)
        conn.execute(sql.SQL("create role {} login nosuperuser nocreatedb nocreaterole")
                     .format(role))
        passwords.set_password(conn, settings.user, app_password)
        conn.execute(sql.SQL("create database {} owner {}").format(db, role))
        conn.execute(sql.SQL("revoke all on database {} from public").format(db))
        # No Optuna tables: the first worker's Optuna makes its own (see schema.py), so
        # that the server serves whichever Optuna version its workers bring.


def _repair(home: Home, settings: Settings) -> None:
    for secret in (home.app_passfile, home.superuser_passfile):
        if not secret.is_file():
            raise UsageError(f"{secret} is missing: pgjob cannot reach the server without "
                             "it. Restore it from a backup of the home, or start a new home "
                             "with `pgjob init --home NEWDIR` and `pgjob restore`")
    if not (home.data / "PG_VERSION").is_file():
        raise UsageError(f"{home.data} holds no PostgreSQL data directory (no PG_VERSION); "
                         "the home is damaged: restore the data directory from a backup")
    tls.ensure_ca(home)  # homes made before TLS get their CA here
    signing.ensure_key(home)  # and before journals their snapshot key
    home.tighten()
    _finish_rotation(home, settings)
    instance.write_resting_conf(home, settings)


def _finish_rotation(home: Home, settings: Settings) -> None:
    """A `pgjob rotate-password` cut short between ALTER ROLE and the rename of its new
    passfile left the new password pending: keep whichever one the server accepts.

    A live server is asked over its endpoint; otherwise a private server of our own, with
    the home's lease held so that no serve starts on the data directory meanwhile.
    """
    if not home.pending_passfile.exists():
        return
    held = lease.read(home)
    if held is not None and not (held.expired() or held.holder_gone()):
        published = endpoint.read(home)
        if published is None:
            raise UsageError(f"{home.path} is being served but not published (starting or "
                             "stopping); run `pgjob init` again once it serves or has stopped")
        passwords.finish_rotation(home, passwords.endpoint_probe(home, published))
        return
    mine = lease.acquire(home, job_id="")
    try:
        with temporary_server(home, settings, Path(settings.pg_bin)) as server:
            passwords.finish_rotation(home, passwords.socket_probe(server.socket_dir,
                                                                   server.port, settings))
    finally:
        lease.release(home, mine)


def init(home_option, *, workers=None, port=None, database=None, user=None, allow=(),
         pg_bin=None, run_as=None, storage=None) -> InitResult:
    """A new home (its study database empty: the first worker's Optuna makes its tables),
    or an existing one checked and repaired."""
    home = open_home(home_option)
    _check_target(home)
    existed = home.is_home()
    settings = load_settings(home.settings_file, workers=workers, port=port,
                             database=database, user=user, allow=tuple(allow), run_as=run_as,
                             pg_bin=pg_bin, storage=storage)
    if existed and (database or user) and (settings.database, settings.user) != (
            home.settings().database, home.settings().user):
        raise UsageError("--database and --user cannot change on an existing home; "
                         "create a new home for a new database")
    bindir = binaries.find(settings.pg_bin)
    settings = replace(settings, pg_bin=str(bindir))
    home.path.mkdir(parents=True, exist_ok=True)
    home.mkdir(home.path)
    for sub in (home.secrets, home.logs, home.run):
        home.mkdir(sub)
    if existed and (home.data / "PG_VERSION").exists():
        _repair(home, settings)
    else:
        if home.data.exists():
            shutil.rmtree(home.data)  # a half-made data directory from a failed init
        _create_cluster(home, settings, bindir)
    home.save_settings(settings)  # last: a home counts as made only once all of it is
    return InitResult(home=home, settings=settings, created=not existed)


def restore_new_home(dump_file: Path, home_option, **init_options) -> Home:
    """A new home made by `pgjob init`, with the study database loaded from `dump_file`,
    of the kind of storage (rdb or journal) whose studies the dump holds."""
    dump_file = Path(dump_file).absolute()
    if not dump_file.is_file():
        raise UsageError(f"no backup file at {dump_file}")
    target = resolve_path(home_option)
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"{target} exists and is not empty: restore goes into a new home. "
                         "Choose a --home that does not exist yet")
    result = init(target, **init_options)  # an empty study database: the dump fills it
    home, settings = result.home, result.settings
    with temporary_server(home, settings, Path(settings.pg_bin)) as server:
        backup.restore(home, Path(settings.pg_bin), dump_file, host=str(server.socket_dir),
                       port=server.port)
        with psycopg.connect(backup.conninfo(home, host=str(server.socket_dir),
                                             port=server.port), autocommit=True) as conn:
            kind = backup.adopt_restored(conn, home)
    if kind != settings.storage:
        home.save_settings(replace(settings, storage=kind))
    return home
