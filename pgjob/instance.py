"""This home's PostgreSQL on this node: the one owner of how it is configured and started.

- the configuration pgjob owns in the data directory (pgjob.conf, its include line, the
  marked pg_hba block) and the networks it lets in;
- the temporary server that `pgjob init` and `pgjob restore` work on (Unix socket only);
- a postmaster.pid left by a server that is gone, set aside;
- serve's node-local private directory (the socket, pgbouncer's files), marked with the
  serve it belongs to, and what killed serves left of theirs;
- `Instance`: the server serve runs, started on a free port, optionally behind pgbouncer,
  and described as the endpoint that workers are sent to.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import psycopg

from . import conf, control, endpoint, netinfo, pooler, tls
from .cluster import Server, connect, private_socket_dir
from .endpoint import Endpoint
from .errors import AlreadyServing, ServerFailed
from .home import Home, json_object
from .schedulers import Job, node_name
from .settings import Settings

BIND_FAILED = "could not create any TCP/IP sockets"
BIND_ATTEMPTS = 3
PRIVATE_MARK = "serve.json"  # in serve's private directory: whose it is


def allowed_networks(settings: Settings) -> tuple[str, ...]:
    """The networks whose clients may connect: the `allow` setting, else this node's."""
    return settings.allow or netinfo.networks()


def write_conf(home: Home, settings: Settings, params: dict) -> None:
    """pgjob.conf with `params`, the include line and our pg_hba block, inside the data
    directory (a user's own lines in postgresql.conf and pg_hba.conf are kept)."""
    data = home.data
    home.write(data / "pgjob.conf", conf.render_conf(params))
    included = conf.ensure_include(data / "postgresql.conf")
    if included is not None:
        home.write(data / "postgresql.conf", included)
    hba = data / "pg_hba.conf"
    block = conf.hba_block(conf.Access(settings.database, settings.user,
                                       settings.superuser, allowed_networks(settings)))
    home.write(hba, conf.merge_hba(hba.read_text() if hba.exists() else None, block))


def write_resting_conf(home: Home, settings: Settings) -> None:
    """The configuration between serves: no node's address or socket in it."""
    write_conf(home, settings, conf.static_params(settings.workers))


def server(home: Home, settings: Settings, bindir: Path, socket_dir: Path,
           port: int) -> Server:
    """The home's postmaster, reachable by its superuser over `socket_dir`."""
    return Server(log=home.ensure_file(home.server_log), bindir=bindir, data=home.data,
                  socket_dir=socket_dir, port=port, superuser=settings.superuser,
                  passfile=home.superuser_passfile)


@contextmanager
def temporary_server(home: Home, settings: Settings, bindir: Path) -> Iterator[Server]:
    """The home's server on a private Unix socket only, for set-up work (no TCP at all)."""
    socket_dir = private_socket_dir()
    running = server(home, settings, bindir, socket_dir, settings.port)
    home.write(home.data / "pgjob.conf", conf.render_conf(
        {**conf.static_params(settings.workers), "port": settings.port,
         "unix_socket_directories": str(socket_dir)}))
    running.start()
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
        home.write(home.data / "pgjob.conf",
                   conf.render_conf(conf.static_params(settings.workers)))


def set_aside_stale_pidfile(data: Path) -> str | None:
    """Move a postmaster.pid left by a server that is gone out of PostgreSQL's way.

    Called only while we hold the lease and no published server answers. A live postmaster
    on this node for this data directory is never touched.
    """
    pidfile = data / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        running = psutil.Process(pid)
        if running.name() in ("postgres", "postmaster") and str(data) in running.cmdline():
            raise AlreadyServing(f"PostgreSQL (pid {pid}) already runs on {data} on this "
                                 f"node, outside pgjob; stop it first (pg_ctl stop -D {data})")
    except psutil.Error:
        pass
    aside = pidfile.with_name(f"postmaster.pid.stale-{int(time.time())}")
    os.replace(pidfile, aside)
    return f"set aside a stale postmaster.pid (pid {pid}, from a server that is gone) as {aside.name}"


def mark_private_dir(socket_dir: Path, record: dict) -> None:
    """Say in serve's private directory which serve it belongs to, so that a later serve
    on this node can tell it was left by one that is gone."""
    fd = os.open(socket_dir / PRIVATE_MARK,
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(record, out)


def left_by_a_dead_serve(path: Path, uid: int) -> bool:
    """Whether `path` is provably a private directory of `uid`'s that a serve on this node
    left when it was killed outright: a real directory (never a link) owned by `uid`, open
    to nobody else, marked by a serve of this node whose process is gone."""
    try:
        st = path.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
            return False
        with os.fdopen(os.open(path / PRIVATE_MARK, os.O_RDONLY | os.O_NOFOLLOW)) as mark:
            record = json_object(mark.read())
    except (OSError, ValueError):
        return False
    return (record.get("node") == node_name()
            and "pid" in record and not control.record_is_live(record))


def remove_stale_private_dirs(uid: int, bases: tuple[str, ...] = ()) -> list[Path]:
    """Remove what serves of `uid` killed on this node (SIGKILL, the OOM killer) left in
    the node's temp directories (`bases`, default: where private_socket_dir makes them);
    nothing that is not provably theirs and dead."""
    removed = []
    bases = bases or (os.environ.get("TMPDIR", ""), "/tmp")
    for base in dict.fromkeys(filter(None, bases)):
        try:
            found = sorted(Path(base).glob(f"pgjob-{uid}-*"))
        except OSError:
            continue
        for path in found:
            if left_by_a_dead_serve(path, uid):
                shutil.rmtree(path, ignore_errors=True)  # fd-based: follows no link
                removed.append(path)
    return removed


@dataclass
class Instance:
    """The home's server as serve runs it on this node: PostgreSQL on the node's address
    (or on its private socket only, with pgbouncer on the address), TLS with a
    certificate for this node, and the endpoint that describes it to workers."""

    home: Home
    settings: Settings
    bindir: Path
    address: str  # the node's address that workers reach
    job: Job
    socket_dir: Path  # serve's node-local private directory
    pooler_bin: Path | None = None  # pgbouncer, when the settings ask for it
    server: Server | None = None
    front: pooler.Front | None = None

    @property
    def port(self) -> int:
        """The published port: pgbouncer's when it is in front, else PostgreSQL's."""
        return self.front.port if self.front else self.server.port

    def start(self) -> list[str]:
        """Start on the configured port, or a free one; a port taken between our probe and
        PostgreSQL's bind (two jobs starting at once) means: probe again. Returns what is
        worth a warning (the port moved)."""
        home, settings = self.home, self.settings
        tls.ensure_ca(home)
        ssl_params = tls.install_server_cert(home, address=self.address, node=self.job.node)
        if self.pooler_bin is not None:
            self._start_behind_pooler(ssl_params)
            return []
        wanted, notes = settings.port, []
        for attempt in range(BIND_ATTEMPTS):
            port = netinfo.pick_port(self.address, wanted)
            if port != settings.port:
                notes.append(f"port {settings.port} is taken on {self.address}; serving on "
                             f"{port} instead")
            self._configure(listen=self.address, port=port, ssl_params=ssl_params)
            self.server = server(home, settings, self.bindir, self.socket_dir, port)
            try:
                self.server.start()
                return notes[-1:]
            except ServerFailed as exc:
                if BIND_FAILED not in exc.detail or attempt == BIND_ATTEMPTS - 1:
                    raise
                wanted = 0  # let the kernel choose
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _configure(self, *, listen: str, port: int, ssl_params: dict) -> None:
        write_conf(self.home, self.settings, {
            **conf.static_params(self.settings.workers),
            **conf.node_params(port=port, listen=listen, socket_dir=str(self.socket_dir),
                               memory_bytes=self.job.memory_bytes), **ssl_params})

    def _start_behind_pooler(self, ssl_params: dict) -> None:
        """PostgreSQL on its private socket only; pgbouncer on the published address."""
        home, settings = self.home, self.settings
        self._configure(listen="", port=settings.port, ssl_params=ssl_params)
        self.server = server(home, settings, self.bindir, self.socket_dir, settings.port)
        self.server.start()
        self.front = pooler.Front(
            pooler.Pooler(log=home.ensure_file(home.pooler_log), binary=self.pooler_bin,
                          workdir=self.socket_dir),
            home=home, settings=settings, address=self.address, server=self.server,
            networks=allowed_networks(settings))
        self.front.launch(settings.port)

    def check_pooler(self) -> bool:
        """Keep pgbouncer running and its password current; True when it came back on
        another port (the endpoint must be published again)."""
        return self.front is not None and self.front.check()

    def stop_pooler(self) -> None:
        if self.front is not None:
            self.front.pool.stop()

    def study_database(self) -> psycopg.Connection:
        """A connection to the study database over the private socket. The study database
        is the application role's: its tables, triggers and defaults are code that role
        wrote, so only the role itself works there, never the superuser."""
        return connect(host=str(self.socket_dir), port=self.server.port,
                       user=self.settings.user, dbname=self.settings.database,
                       passfile=self.home.app_passfile)

    def describe(self, generation: int) -> Endpoint:
        """The endpoint that sends workers to this server (asked for its identity now)."""
        with self.server.connect() as conn:
            ident = conn.execute(
                "select system_identifier::text from pg_control_system()").fetchone()[0]
        return Endpoint(
            host=self.address, port=self.port, pooler="pgbouncer" if self.front else "",
            database=self.settings.database, user=self.settings.user,
            passfile=str(self.home.app_passfile),
            sslrootcert=str(self.home.ca_cert), node=self.job.node,
            job_id=self.job.job_id, scheduler=self.job.scheduler,
            pid=self.server.process.pid, started_at=time.time(), generation=generation,
            system_identifier=ident)

    def is_published(self, published: dict) -> bool:
        """Whether a published endpoint (raw) names this very PostgreSQL."""
        return (self.server is not None and self.server.process is not None
                and published.get("state") == endpoint.SERVING
                and published.get("node") == self.job.node
                and published.get("pid") == self.server.process.pid)
