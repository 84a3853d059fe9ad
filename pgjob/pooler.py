"""pgbouncer in front of the server, for studies with hundreds of worker processes.

With `pooler = "pgbouncer"` in pgjob.toml (or PGJOB_POOLER), serve starts pgbouncer on the
published address and port, and PostgreSQL listens on its private Unix socket only.
pgbouncer takes the clients' TLS (the same certificate), checks them against the same
networks and SCRAM password as pg_hba would, and shares a few server connections among
them in transaction mode. Its files live in serve's node-local private directory, never
on the shared filesystem. Its user list holds no password: it holds the role's SCRAM
verifier as PostgreSQL stores it, with which pgbouncer checks a client's SCRAM proof and
then passes that client's keys on to PostgreSQL, so a file left behind by a serve that was
killed outright gives nobody a way in.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from . import conf, netinfo, proc
from .cluster import Server, log_tail
from .errors import ServerFailed, UsageError
from .home import Home
from .settings import Settings
from .waiting import until

log = logging.getLogger("pgjob.pooler")

SEARCH = ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/local/bin/pgbouncer")
SERVER_POOL = 20  # server connections per database/user pair: enough for 2 cores' worth


def wanted(kind: str) -> bool:
    """Whether the `pooler` setting (checked where settings enter) asks for pgbouncer."""
    return kind == "pgbouncer"


def find() -> Path | None:
    found = shutil.which("pgbouncer") or next(
        (p for p in SEARCH if Path(p).is_file()), None)
    return Path(found) if found else None


def require() -> Path:
    found = find()
    if found is None:
        raise UsageError("pooler = \"pgbouncer\" is set, but no pgbouncer was found (looked "
                         f"on PATH and in {', '.join(SEARCH)}). Install it (apt-get install "
                         "pgbouncer, or conda install -c conda-forge pgbouncer), or remove "
                         "the setting from pgjob.toml / PGJOB_POOLER")
    return found


SCRAM_PREFIX = "SCRAM-SHA-256$"


def stored_verifier(server: Server, user: str) -> str:
    """The role's SCRAM verifier as PostgreSQL stores it, never its password.

    Read by the superuser over serve's private socket from pg_authid, a shared catalog
    (no object of the application role is touched, so none of its code runs). pgbouncer
    passes SCRAM through to the server only when its secret is this very verifier.
    """
    with server.connect() as conn:
        row = conn.execute("select rolpassword from pg_authid where rolname = %s",
                           (user,)).fetchone()
    verifier = (row[0] if row else None) or ""
    if not verifier.startswith(SCRAM_PREFIX):
        raise ServerFailed(f"the role {user} has no SCRAM-SHA-256 password in the server, "
                           "so pgbouncer cannot check its clients; serve once without the "
                           "pooler and run `pgjob rotate-password`, which stores one")
    return verifier


def _quote_ini(text: str) -> str:
    if any(c in text for c in " ;=\n"):
        raise UsageError(f"{text!r} cannot go into pgbouncer's settings; use a path without "
                         "spaces, ';' or '='")
    return text


def render_ini(*, listen: str, port: int, pg_socket_dir: Path, pg_port: int, database: str,
               workdir: Path, cert: Path, key: Path, max_clients: int) -> str:
    """pgbouncer.ini: TLS required, the hba file decides who may connect, transaction
    pooling onto PostgreSQL's Unix socket. `database` goes in bare: the settings admit
    only names of letters, digits and '_', which pgbouncer reads without quoting."""
    lines = {
        "listen_addr": listen, "listen_port": port, "unix_socket_dir": "",
        "auth_type": "hba", "auth_hba_file": workdir / "hba.conf",
        "auth_file": workdir / "userlist.txt",
        "client_tls_sslmode": "require", "client_tls_cert_file": cert,
        "client_tls_key_file": key, "client_tls_protocols": "secure",
        "pool_mode": "transaction", "default_pool_size": SERVER_POOL,
        "max_client_conn": max_clients, "ignore_startup_parameters": "extra_float_digits",
        "pidfile": workdir / "pgbouncer.pid", "logfile": "", "syslog": 0,
        "log_connections": 0, "log_disconnections": 0,
    }
    body = "".join(f"{k} = {_quote_ini(str(v))}\n" for k, v in lines.items())
    return (f"[databases]\n{database} = host={pg_socket_dir} port={pg_port} "
            f"dbname={database}\n\n[pgbouncer]\n{body}")


def render_hba(database: str, user: str, networks: tuple[str, ...]) -> str:
    """pgbouncer's hba file: the app role over TLS from the allowed networks, names quoted
    as in pg_hba.conf (pgbouncer reads them the same way)."""
    db, role = conf.hba_name(database), conf.hba_name(user)
    rows = [f"hostssl {db} {role} {net} scram-sha-256\n" for net in networks]
    return "".join(rows) + "host all all 0.0.0.0/0 reject\nhost all all ::/0 reject\n"


def render_userlist(user: str, verifier: str) -> str:
    """pgbouncer's auth_file: the user and its SCRAM verifier, '"' doubled inside quotes."""
    def quoted(text: str) -> str:
        return '"' + text.replace('"', '""') + '"'
    return f"{quoted(user)} {quoted(verifier)}\n"


@dataclass
class Pooler(proc.ManagedProcess):
    """One pgbouncer that serve started and owns."""

    binary: Path
    workdir: Path

    def command(self) -> list:
        return [self.binary, self.workdir / "pgbouncer.ini"]

    def write(self, name: str, text: str) -> None:
        path = self.workdir / name
        before = int(path.stat().st_mtime) if path.exists() else 0
        path.write_text(text)
        path.chmod(0o600)
        # pgbouncer re-reads a file on SIGHUP only if its mtime, in whole seconds, or its
        # size changed: a rotated password has the same length, maybe the same second.
        stamp = max(int(time.time()), before + 1)
        os.utime(path, (stamp, stamp))

    def start(self) -> None:
        self.spawn()

    def listening(self, address: str, port: int, timeout: float = 15) -> bool:
        """Wait until pgbouncer accepts connections; False when it exits first."""
        def ready():
            if not self.alive():
                return True
            try:
                socket.create_connection((address, port), timeout=1).close()
                return True
            except OSError:
                return False
        return bool(until(ready, timeout, interval=0.02)) and self.alive()

    def failed(self, what: str) -> ServerFailed:
        return ServerFailed(f"pgbouncer {what}; see {self.log}",
                            detail="pgbouncer log (last lines):\n" + log_tail(self.log))

    def reload(self) -> None:
        """Re-read the user list (after `pgjob rotate-password`)."""
        self.send(signal.SIGHUP)

    def stop(self, timeout: float = 10) -> None:
        # SIGTERM is pgbouncer's immediate shutdown: serve stops the clients anyway.
        self.stop_by([(signal.SIGTERM, timeout), (signal.SIGKILL, 30)])


@dataclass
class Front:
    """pgbouncer as serve runs it, in front of the server it started: its files written
    from the home's settings, kept alive, and given the new verifier after a rotation."""

    pool: Pooler
    home: Home
    settings: Settings
    address: str
    server: Server  # PostgreSQL behind it, on serve's private socket
    networks: tuple[str, ...]  # whose clients it lets in (the same as pg_hba's)
    port: int = 0
    passfile_mtime: float = 0.0

    def launch(self, wanted_port: int) -> None:
        """Start on `wanted_port`, or on a free port when that one is taken (another job
        may bind it between our probe and pgbouncer's)."""
        for _ in range(3):
            port = netinfo.pick_port(self.address, wanted_port)
            self._write_files(port)
            self.pool.start()
            if self.pool.listening(self.address, port):
                self.port = port
                return
            self.pool.stop()
            wanted_port = 0
        raise self.pool.failed(f"did not start listening on {self.address}")

    def _write_files(self, port: int) -> None:
        home, settings, workdir = self.home, self.settings, self.pool.workdir
        self.pool.write("pgbouncer.ini", render_ini(
            listen=self.address, port=port, pg_socket_dir=workdir, pg_port=self.server.port,
            database=settings.database, workdir=workdir, cert=home.server_cert,
            key=home.server_key, max_clients=2 * settings.workers + 10))
        self.pool.write("hba.conf", render_hba(settings.database, settings.user,
                                               self.networks))
        self._write_userlist()

    def _write_userlist(self) -> bool:
        """The role's verifier, as the server has it now, into pgbouncer's user list. False
        when the server did not answer (it is being restarted): the list stays as it was,
        and the next check tries again."""
        # The passfile's mtime first: a rotation that lands while we read is seen next time.
        mtime = self.home.app_passfile.stat().st_mtime
        user = self.settings.user
        try:
            verifier = stored_verifier(self.server, user)
        except psycopg.Error as exc:
            log.warning("could not read the password verifier of %s for pgbouncer (%s); "
                        "trying again at the next check", user, str(exc).strip())
            return False
        self.pool.write("userlist.txt", render_userlist(user, verifier))
        self.passfile_mtime = mtime
        return True

    def check(self) -> bool:
        """Restart pgbouncer if it died; give it the new verifier after a rotation.
        True when it now listens on another port (the endpoint must be published again)."""
        if not self.pool.alive():
            log.warning("pgbouncer exited (code %s); restarting it (see %s)",
                        self.pool.returncode, self.pool.log)
            before = self.port
            self.launch(before)
            return self.port != before
        if self.home.app_passfile.stat().st_mtime != self.passfile_mtime:
            if self._write_userlist():
                self.pool.reload()
                log.info("pgbouncer reloaded with the rotated password")
        return False
