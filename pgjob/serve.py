"""`pgjob serve`: the keep-alive loop that is the body of a batch job.

Start PostgreSQL configured for this node, make the Optuna schema once, publish the
endpoint, keep the server answering, and on any stop signal withdraw the endpoint first,
then shut the server down cleanly.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import binaries, conf, endpoint, netinfo, scheduler
from .cluster import Server, cluster_state, log_tail, private_socket_dir
from .endpoint import Endpoint
from .errors import AlreadyServing, ServerFailed
from .home import Home, open_home
from .initialize import allowed_networks, write_server_conf
from .schema import ensure_optuna_schema
from .waiting import until

log = logging.getLogger("pgjob.serve")

BIND_FAILED = "could not create any TCP/IP sockets"
BIND_ATTEMPTS = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


def pick_port(address: str, wanted: int) -> int:
    """`wanted` when nobody listens on it at `address`, else a port the kernel says is free."""
    for port in (wanted, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise ServerFailed(f"no free TCP port on {address}; is that address on this node? "
                       "Use --host or --interface to choose the address to serve on")


def read_record(home: Home) -> dict:
    try:
        return json.loads(home.serve_record.read_text())
    except (OSError, ValueError):
        return {}


def record_is_live(record: dict) -> bool:
    """True when the serve process the record names still runs on this node."""
    if record.get("node") != socket.gethostname():
        return False
    try:
        return psutil.Process(record["pid"]).create_time() == record["create_time"]
    except (KeyError, psutil.Error):
        return False


def refuse_second_serve(home: Home) -> None:
    record = read_record(home)
    if record_is_live(record):
        raise AlreadyServing(f"pgjob serve already runs this home on this node (pid "
                             f"{record['pid']}); stop it with `pgjob stop` first")
    current = endpoint.read(home)
    if current and endpoint.check(current, timeout=3) is None:
        raise AlreadyServing(
            f"a server for this home already answers at {current.host}:{current.port} "
            f"(node {current.node}, job {current.job_id or '-'}); two servers on one data "
            "directory would corrupt it. Stop that one with `pgjob stop` first")


@dataclass
class Serve:
    home: Home
    host: str = ""
    interface: str = ""
    health_interval: float = 5.0
    max_restarts: int = 3
    stop_reason: str = ""
    restarts: list[float] = field(default_factory=list)

    def run(self) -> int:
        home = self.home
        settings = home.settings()
        self.bindir = bindir = binaries.find(settings.pg_bin)
        refuse_second_serve(home)
        job = scheduler.current()
        me = psutil.Process()
        self._install_signals()
        address = netinfo.address(self.host, self.interface)
        socket_dir = private_socket_dir(home.owner)
        try:
            home.write(home.serve_record, json.dumps(
                {"node": socket.gethostname(), "pid": me.pid,
                 "create_time": me.create_time(), "job_id": job.job_id}) + "\n")
            home.stop_request.unlink(missing_ok=True)
            self._start_on_a_free_port(address, settings, job, socket_dir)
            ensure_optuna_schema(socket_dir, self.server.port, settings, home.app_passfile)
            self._publish(address, settings, job)
            log.info("serving %s at %s:%d (node %s, job %s)", home.path, address,
                     self.server.port,
                     job.node, job.job_id or "-")
            return self._keep_alive(address, settings, job)
        finally:
            self._shutdown(bindir)
            shutil.rmtree(socket_dir, ignore_errors=True)
            home.serve_record.unlink(missing_ok=True)
            home.stop_request.unlink(missing_ok=True)

    def _start_on_a_free_port(self, address: str, settings, job, socket_dir: Path) -> None:
        """Start on the configured port, or a free one; a port taken between our probe and
        PostgreSQL's bind (two jobs starting at once) means: probe again."""
        home, wanted = self.home, settings.port
        for attempt in range(BIND_ATTEMPTS):
            port = pick_port(address, wanted)
            if port != settings.port:
                log.warning("port %d is taken on %s; serving on %d instead", settings.port,
                            address, port)
            write_server_conf(home, settings, {
                **conf.static_params(settings.workers),
                **conf.node_params(port=port, listen=address, socket_dir=str(socket_dir),
                                   memory_bytes=job.memory_bytes)}, allowed_networks(settings))
            self.server = Server(bindir=self.bindir, data=home.data,
                                 log=home.ensure_file(home.server_log), socket_dir=socket_dir,
                                 port=port, superuser=settings.superuser,
                                 passfile=home.superuser_passfile, account=home.owner)
            try:
                self.server.start()
                return
            except ServerFailed as exc:
                if BIND_FAILED not in exc.detail or attempt == BIND_ATTEMPTS - 1:
                    raise
                wanted = 0  # let the kernel choose

    def _install_signals(self) -> None:
        def handler(signum, _frame):
            self.stop_reason = self.stop_reason or signal.Signals(signum).name
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)

    def _publish(self, address: str, settings, job: scheduler.Job) -> None:
        with self.server.connect() as conn:
            ident = conn.execute(
                "select system_identifier::text from pg_control_system()").fetchone()[0]
        endpoint.publish(self.home, Endpoint(
            host=address, port=self.server.port, database=settings.database,
            user=settings.user, passfile=str(self.home.app_passfile), node=job.node,
            job_id=job.job_id, scheduler=job.scheduler, pid=self.server.process.pid,
            started_at=time.time(), generation=endpoint.last_generation(self.home) + 1,
            system_identifier=ident))

    def _stop_asked(self) -> bool:
        if not self.stop_reason and self.home.stop_request.exists():
            self.stop_reason = "pgjob stop"
        return bool(self.stop_reason)

    def _keep_alive(self, address: str, settings, job) -> int:
        while True:
            if until(self._stop_asked, self.health_interval, interval=0.25):
                log.info("stopping: %s", self.stop_reason)
                return 0
            if self.server.alive():
                if not self.server.answers():
                    log.warning("the server is running but did not answer a query within "
                                "5 s; it may be overloaded (see %s)", self.home.server_log)
                continue
            self._restart(address, settings, job)

    def _restart(self, address: str, settings, job) -> None:
        code = self.server.process.returncode
        endpoint.withdraw(self.home, f"server died (exit code {code}); restarting")
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 600] + [now]
        if len(self.restarts) > self.max_restarts:
            raise ServerFailed(
                f"PostgreSQL died {len(self.restarts)} times in 10 minutes (last exit code "
                f"{code}); giving up. See {self.home.server_log}",
                detail="server log (last lines):\n" + log_tail(self.home.server_log))
        log.warning("PostgreSQL exited (code %s); restarting it (%d of at most %d)", code,
                    len(self.restarts), self.max_restarts)
        self.server.start()
        self._publish(address, settings, job)

    def _shutdown(self, bindir: Path) -> None:
        """Withdraw first, so no worker is sent here; then checkpoint and stop."""
        endpoint.withdraw(self.home, self.stop_reason or "serve ended")
        server = getattr(self, "server", None)
        if server is None or server.process is None:
            return
        if server.alive():
            server.checkpoint()
        server.stop()
        state = cluster_state(bindir, self.home.data, self.home.owner)
        if state == "shut down":
            log.info("PostgreSQL stopped cleanly (pg_controldata: shut down)")
        else:
            log.warning("PostgreSQL stopped, but pg_controldata says %r; the next start "
                        "will recover from the WAL", state)


def serve(home_option, *, host: str = "", interface: str = "", run_as: str = "",
          health_interval: float = 5.0) -> int:
    home = open_home(home_option, run_as, server=True).require()
    return Serve(home, host=host, interface=interface,
                 health_interval=health_interval).run()


def request_stop(home_option, wait: float = 0) -> bool:
    """Ask the serving process to stop, from any node that sees the home.

    Returns True when nothing serves the home any more (at once, or within `wait` s).
    """
    home = open_home(home_option).require()
    record = read_record(home)
    if not record and endpoint.read(home) is None:
        return True
    home.write(home.stop_request, f"{time.time()}\n")
    if record_is_live(record):
        try:
            os.kill(record["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    return bool(until(lambda: not home.serve_record.exists(), wait, interval=0.2))
