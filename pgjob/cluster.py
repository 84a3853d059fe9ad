"""The PostgreSQL server process itself: initdb, start, readiness, stop, control data."""
from __future__ import annotations

import os
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psycopg

from . import proc
from .errors import CommandFailed, ServerFailed
from .waiting import until

# pg_controldata prints these in English only under the C locale.
C_ENV = {"LC_ALL": "C", "LANG": "C", "PATH": os.defpath}


def log_tail(log: Path, lines: int = 20) -> str:
    try:
        with open(log, errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines))
    except OSError:
        return ""


def initdb(bindir: Path, data: Path, *, superuser: str, pwfile: Path) -> None:
    """A new cluster: UTF8 with the C locale (so no job's environment can break it),
    scram-sha-256 for every connection, and a generated superuser password."""
    proc.run([bindir / "initdb", "-D", data, "--encoding=UTF8", "--no-locale",
              f"--username={superuser}", f"--pwfile={pwfile}",
              "--auth-local=scram-sha-256", "--auth-host=scram-sha-256"],
             timeout=300, what="initdb failed", env=C_ENV)


def controldata(bindir: Path, data: Path) -> dict[str, str]:
    out = proc.run([bindir / "pg_controldata", "-D", data], timeout=30,
                   what="pg_controldata failed", env=C_ENV)
    fields = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def cluster_state(bindir: Path, data: Path) -> str:
    """'shut down', 'in production', ...: what PostgreSQL itself says of the data directory."""
    return controldata(bindir, data).get("Database cluster state", "unknown")


def connect(*, host: str, port: int, user: str, dbname: str, passfile: Path,
            timeout: float = 5, **extra) -> psycopg.Connection:
    return psycopg.connect(host=host, port=port, user=user, dbname=dbname,
                           passfile=str(passfile), connect_timeout=max(1, int(timeout)),
                           autocommit=True, **extra)


@dataclass
class Server(proc.ManagedProcess):
    """One postmaster that we started and own, reachable over its private Unix socket."""

    bindir: Path
    data: Path
    socket_dir: Path
    port: int
    superuser: str
    passfile: Path

    def command(self) -> list:
        return [self.bindir / "postgres", "-D", self.data]

    def environment(self) -> dict[str, str]:
        return C_ENV

    def start(self, timeout: float = 120) -> None:
        self.spawn()
        if not until(self._ready_or_dead, timeout, interval=0.02):
            self.stop()
            raise CommandFailed(f"PostgreSQL did not accept connections within {timeout:.0f} s",
                                argv=[str(a) for a in self.command()],
                                returncode=None, log_tail=log_tail(self.log))
        if not self.alive():
            raise ServerFailed(
                f"PostgreSQL exited at start (exit code {self.returncode}); "
                f"see {self.log}", detail="server log (last lines):\n" + log_tail(self.log))

    def _ready_or_dead(self) -> bool:
        if not self.alive():
            return True
        try:
            self.connect(timeout=1).close()
            return True
        except psycopg.OperationalError:
            return False

    def connect(self, dbname: str = "postgres", timeout: float = 5) -> psycopg.Connection:
        return connect(host=str(self.socket_dir), port=self.port, user=self.superuser,
                       dbname=dbname, passfile=self.passfile, timeout=timeout)

    def answers(self) -> bool:
        try:
            with self.connect(timeout=5) as conn:
                conn.execute("select 1")
            return True
        except psycopg.Error:
            return False

    def checkpoint(self) -> None:
        try:
            with self.connect(timeout=5) as conn:
                conn.execute("checkpoint")
        except psycopg.Error:
            pass  # shutdown checkpoints anyway; this one only shortens it

    def stop(self, fast_timeout: float = 60, immediate_timeout: float = 20) -> int | None:
        """Fast shutdown; immediate if that hangs (at once with fast_timeout=0); SIGKILL as
        the last resort. Returns the postmaster's exit code (None if it never ran)."""
        ladder = [(signal.SIGINT, fast_timeout)] if fast_timeout else []
        return self.stop_by(ladder + [(signal.SIGQUIT, immediate_timeout),
                                      (signal.SIGKILL, 30)])


SOCKET_PATH_MAX = 107  # sun_path, less the terminating NUL


def private_socket_dir() -> Path:
    """A fresh node-local directory (0700) for the server's Unix socket.

    Sockets on NFS do not work, and a socket path over 107 bytes cannot be bound, so this
    lives under $TMPDIR (usually node-local on clusters) or /tmp, with a short name.
    """
    import tempfile

    uid = os.geteuid()
    bases = [os.environ.get("TMPDIR", ""), "/tmp"]
    for base in filter(None, bases):
        if not os.access(base, os.W_OK | os.X_OK) or len(base) + 40 > SOCKET_PATH_MAX:
            continue
        return Path(tempfile.mkdtemp(prefix=f"pgjob-{uid}-", dir=base))
    raise ServerFailed("no node-local directory for the server socket: $TMPDIR and /tmp "
                       "are missing, not writable by you, or their paths are too long; set TMPDIR to a short path")
