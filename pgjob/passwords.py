"""Passwords: generated, kept only in 0600 passfiles, set as SCRAM verifiers, rotated."""
from __future__ import annotations

import secrets

import psycopg
from psycopg import sql

from . import endpoint
from .home import Home


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
    """A new application password, set on the running server, then in the passfile.

    Sessions already open keep working; a worker that connects in the moment between the
    two steps is refused once and retries (pgjob's storage does that by itself).
    """
    found = endpoint.wait_connectable(home, timeout=0)
    password = generate()
    with found.connect() as conn:  # a role may change its own password
        set_password(conn, found.user, password)
    home.write(home.app_passfile, passfile_line(found.user, password))
