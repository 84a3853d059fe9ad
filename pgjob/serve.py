"""`pgjob serve`: the keep-alive loop that is the body of a batch job.

Take the home's lease, start PostgreSQL configured for this node, make the Optuna schema
once, publish the endpoint, and keep the server answering (renewing the lease, sweeping
stale trials, taking backups). On any stop signal: withdraw the endpoint first, take a
last backup, then shut the server down cleanly and give the lease up.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from . import (backup, binaries, conf, endpoint, lease, netinfo, passwords, pooler,
               submit, tls)
from . import schedulers as scheduler  # the registry; serve asks it as `scheduler`
from .cluster import Server, cluster_state, connect, log_tail, private_socket_dir
from .endpoint import Endpoint
from .errors import AlreadyServing, LeaseExpired, LeaseLost, PgJobError, ServerFailed
from .home import Home, open_home
from .initialize import allowed_networks, write_server_conf
from .schema import socket_url
from .trials import StaleTrialSweeper, refresh_heartbeats
from .waiting import until

log = logging.getLogger("pgjob.serve")

BIND_FAILED = "could not create any TCP/IP sockets"
BIND_ATTEMPTS = 3
# SIGUSR2 is what LSF sends when a job reaches its run limit (ten minutes before SIGKILL).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
WALLTIME_MARGIN = 300  # a SIGTERM this close to the job's end is the time limit, not a cancel
TIME_LIMIT = "the job's time limit is near"  # the reason of a self-scheduled stop
DISK_FULL_BYTES = 64 * 1024 * 1024


def read_record(home: Home) -> dict:
    try:
        record = json.loads(home.serve_record.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def record_is_live(record: dict) -> bool:
    """True when the serve process the record names still runs on this node."""
    if record.get("node") != scheduler.node_name():
        return False
    try:
        return psutil.Process(record["pid"]).create_time() == record["create_time"]
    except (KeyError, TypeError, ValueError, OverflowError, psutil.Error):
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


PRIVATE_MARK = "serve.json"  # in serve's private directory: whose it is


def own_record() -> dict:
    """This serve process as the serve record and its private directory name it."""
    me = psutil.Process()
    return {"node": scheduler.node_name(), "pid": me.pid, "create_time": me.create_time()}


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
            record = json.load(mark)
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("node") == scheduler.node_name()
            and "pid" in record and not record_is_live(record))


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
class Every:
    """An action the keep-alive loop runs every `period` seconds (never, if 0)."""

    period: float
    action: Callable[[], None]
    due: float = 0.0

    def run_if_due(self, now: float) -> None:
        if self.period > 0 and now >= self.due:
            self.due = now + self.period
            self.action()


@dataclass
class Serve:
    home: Home
    host: str = ""
    interface: str = ""
    health_interval: float = 5.0
    renew: bool = False
    max_restarts: int = 3
    stop_reason: str = ""
    restarts: list[float] = field(default_factory=list)
    server: Server | None = None
    keeper: lease.Keeper | None = None  # holds the home's lease and renews it
    lease_lost: bool = False  # proven: another serve holds the home now
    fenced: bool = False  # the lease could not be renewed for its ttl
    job_end: float | None = None
    stop_at: float | None = None  # a self-scheduled stop, where no signal warns of the end
    backup_thread: threading.Thread | None = None
    troubles: set[str] = field(default_factory=set)
    front: pooler.Front | None = None  # pgbouncer, when the settings ask for it

    def run(self) -> int:
        home = self.home
        self.settings = settings = home.settings()
        self.bindir = binaries.find(settings.pg_bin)
        self.pooler_bin = pooler.require() if pooler.wanted(settings.pooler) else None
        self.address = netinfo.address(self.host, self.interface)  # refused before the lease
        refuse_second_serve(home)
        self.job = job = scheduler.current()
        self._install_signals()
        held = lease.acquire(home, job.job_id, ttl=settings.lease_ttl,
                             before_taking=lambda: refuse_second_serve(home))
        for stale in remove_stale_private_dirs(os.geteuid()):
            log.info("removed %s, left on this node by a serve that is gone", stale)
        socket_dir = private_socket_dir()
        try:
            mark_private_dir(socket_dir, own_record())
            self.keeper = lease.Keeper(home, held, fence=self._fence_now)
            self.keeper.start()
            self._write_record()
            note = set_aside_stale_pidfile(home.data)
            if note:
                log.warning("%s", note)
            self._start_on_a_free_port(socket_dir)
            if home.pending_passfile.exists():  # a rotation cut short: settle it first
                passwords.finish_rotation(home, passwords.socket_probe(
                    socket_dir, self.server.port, settings))
            self._publish()
            log.info("serving %s at %s:%d (node %s, job %s%s)", home.path, self.address,
                     self.front.port if self.front else self.server.port, job.node,
                     job.job_id or "-",
                     ", through pgbouncer" if self.front else "")
            self._start_chain()
            return self._keep_alive(socket_dir)
        except LeaseLost as exc:
            self.fenced = isinstance(exc, LeaseExpired)
            self.lease_lost = not self.fenced
            raise
        finally:
            self._shutdown()
            shutil.rmtree(socket_dir, ignore_errors=True)
            home.serve_record.unlink(missing_ok=True)
            home.stop_request.unlink(missing_ok=True)

    def _write_record(self) -> None:
        self.home.write(self.home.serve_record, json.dumps(
            {**own_record(), "job_id": self.job.job_id}) + "\n")
        self.home.stop_request.unlink(missing_ok=True)

    def _start_on_a_free_port(self, socket_dir: Path) -> None:
        """Start on the configured port, or a free one; a port taken between our probe and
        PostgreSQL's bind (two jobs starting at once) means: probe again."""
        home, settings, wanted = self.home, self.settings, self.settings.port
        tls.ensure_ca(home)
        ssl_params = tls.install_server_cert(home, address=self.address, node=self.job.node)
        if self.pooler_bin is not None:
            self._start_behind_pooler(socket_dir, ssl_params)
            return
        for attempt in range(BIND_ATTEMPTS):
            port = netinfo.pick_port(self.address, wanted)
            if port != settings.port:
                log.warning("port %d is taken on %s; serving on %d instead", settings.port,
                            self.address, port)
            write_server_conf(home, settings, {
                **conf.static_params(settings.workers),
                **conf.node_params(port=port, listen=self.address, socket_dir=str(socket_dir),
                                   memory_bytes=self.job.memory_bytes), **ssl_params},
                allowed_networks(settings))
            self.server = Server(bindir=self.bindir, data=home.data,
                                 log=home.ensure_file(home.server_log), socket_dir=socket_dir,
                                 port=port, superuser=settings.superuser,
                                 passfile=home.superuser_passfile)
            try:
                self.server.start()
                return
            except ServerFailed as exc:
                if BIND_FAILED not in exc.detail or attempt == BIND_ATTEMPTS - 1:
                    raise
                wanted = 0  # let the kernel choose

    def _start_behind_pooler(self, socket_dir: Path, ssl_params: dict) -> None:
        """PostgreSQL on its private socket only; pgbouncer on the published address."""
        home, settings = self.home, self.settings
        write_server_conf(home, settings, {
            **conf.static_params(settings.workers),
            **conf.node_params(port=settings.port, listen="", socket_dir=str(socket_dir),
                               memory_bytes=self.job.memory_bytes), **ssl_params},
            allowed_networks(settings))
        self.server = Server(bindir=self.bindir, data=home.data,
                             log=home.ensure_file(home.server_log), socket_dir=socket_dir,
                             port=settings.port, superuser=settings.superuser,
                             passfile=home.superuser_passfile)
        self.server.start()
        self.front = pooler.Front(
            pooler.Pooler(binary=self.pooler_bin, workdir=socket_dir,
                          log=home.ensure_file(home.logs / "pgbouncer.log")),
            home=home, settings=settings, address=self.address, server=self.server)
        self.front.launch(settings.port)

    def _check_pooler(self) -> None:
        if self.front is not None and self.front.check():
            self._publish()  # it came back on another port

    def _install_signals(self) -> None:
        def handler(signum, _frame):
            self.stop_reason = self.stop_reason or signal.Signals(signum).name
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)

    def _study_database(self):
        """A connection to the study database over the private socket. The study database
        is the application role's: its tables, triggers and defaults are code that role
        wrote, so only the role itself works there, never the superuser."""
        return connect(host=str(self.server.socket_dir), port=self.server.port,
                       user=self.settings.user, dbname=self.settings.database,
                       passfile=self.home.app_passfile)

    def _publish(self) -> None:
        with self.server.connect() as conn:
            ident = conn.execute(
                "select system_identifier::text from pg_control_system()").fetchone()[0]
        with self._study_database() as conn:
            refreshed = refresh_heartbeats(conn)
        if refreshed:
            log.info("gave %d running trials a fresh heartbeat after the restart", refreshed)
        endpoint.publish(self.home, Endpoint(
            host=self.address, port=self.front.port if self.front else self.server.port,
            pooler="pgbouncer" if self.front else "", database=self.settings.database,
            user=self.settings.user, passfile=str(self.home.app_passfile),
            sslrootcert=str(tls.ca_paths(self.home)[0]), node=self.job.node,
            job_id=self.job.job_id, scheduler=self.job.scheduler, pid=self.server.process.pid,
            started_at=time.time(), generation=endpoint.last_generation(self.home) + 1,
            system_identifier=ident))

    def _start_chain(self) -> None:
        """With --renew in a batch job: queue the job that takes over when this one ends."""
        self.job_end = self.job.end_time
        self._schedule_own_stop()
        if not self.renew:
            return
        if not scheduler.get(self.job.scheduler).submit_command or not self.job.job_id:
            log.warning("--renew needs a Slurm, PBS or LSF job; serving without renewal")
            return
        successor = submit.submit_successor(self.home, self.job.job_id, self.job.scheduler)
        log.info("renewal: job %s will take over when this job ends", successor)

    def _schedule_own_stop(self) -> None:
        """Where no signal comes before the time limit (PBS), stop a margin before the end,
        so the last backup and a clean shutdown happen before the scheduler kills the job.
        A job with less than twice the margin left serves half of it (a chain of short jobs
        must not stop as soon as each starts)."""
        if self.job.warned_before_end:
            return
        if self.job_end is None:
            log.warning("%s gave no end time for job %s, and sends no signal before the "
                        "time limit: serving without a self-scheduled stop, so the job may "
                        "be killed at its walltime (check `qstat -f %s`)",
                        self.job.scheduler.upper(), self.job.job_id, self.job.job_id)
            return
        left = self.job_end - time.time()
        margin = min(self.settings.stop_margin, left / 2)
        self.stop_at = self.job_end - margin
        log.info("%s sends no signal before the time limit: stopping by itself at %s, "
                 "%.0f s before the job's end", self.job.scheduler.upper(),
                 time.strftime("%H:%M:%S", time.localtime(self.stop_at)), margin)

    def _stop_asked(self) -> bool:
        if not self.stop_reason and self.home.stop_request.exists():
            self.stop_reason = "pgjob stop"
        if not self.stop_reason and self.stop_at is not None and time.time() >= self.stop_at:
            self.stop_reason = TIME_LIMIT
        return bool(self.stop_reason)

    def _keep_alive(self, socket_dir: Path) -> int:
        sweeper = StaleTrialSweeper(self.home, self.settings,
                                    socket_url(socket_dir, self.server.port, self.settings,
                                               self.home.app_passfile),
                                    self._study_database)
        chores = [Every(self.settings.grace_period / 2, sweeper.sweep),
                  Every(self.settings.backup_interval, self._backup_in_background)]
        chores[1].due = time.time() + self.settings.backup_interval  # not right at start
        try:
            while True:
                if until(self._stop_asked, self.health_interval, interval=0.25):
                    log.info("stopping: %s", self.stop_reason)
                    return 0
                self._check_lease()
                self._disk_full()
                self._check_pooler()
                if not self.server.alive():
                    self._restart()
                    continue
                if not self.server.answers():
                    log.warning("the server is running but did not answer a query within "
                                "5 s; it may be overloaded (see %s)", self.home.server_log)
                    continue
                for chore in chores:
                    try:
                        chore.run_if_due(time.time())
                    except Exception as exc:  # a chore must never take the server down
                        log.warning("%s failed: %s", chore.action.__name__, exc)
        finally:
            sweeper.close()

    def _check_lease(self) -> None:
        """Act on what the lease keeper found: a lease proven lost, or not renewed for its
        ttl, ends serving; a failure that may pass (EACCES, ESTALE, EIO, a full disk) is
        said once and retried in the background while the lease lasts."""
        keeper = self.keeper
        if keeper.lost:
            raise LeaseLost(keeper.lost)
        if keeper.lapsed:
            raise LeaseExpired(keeper.lapsed)
        if keeper.trouble:
            self._once("lease", f"could not renew the lease in {self.home.run} "
                                f"({keeper.trouble}); retrying: it is valid for "
                                f"{keeper.lease.ttl:.0f} s from its last renewal",
                       level=logging.WARNING)
        elif "lease" in self.troubles:
            log.info("the lease is renewed again")
            self.troubles.discard("lease")

    def _fence_now(self) -> None:
        """From the lease keeper's thread, when this server must stop writing and the main
        loop may be busy: PostgreSQL's immediate shutdown writes nothing more."""
        server = self.server
        if server is not None and server.alive():
            server.process.send_signal(signal.SIGQUIT)
            log.error("stopped PostgreSQL at once: %s", self.keeper.lost or self.keeper.lapsed)

    def _renew_before_start(self) -> None:
        """Renew the lease just before PostgreSQL starts again: while it was down (a full
        disk can last hours) another serve may have taken the home over."""
        def renewed() -> bool:
            try:
                self.keeper.renew_now()
                return True
            except OSError:
                return False
        if not until(renewed, self.keeper.lease.ttl, interval=1):
            raise LeaseExpired(f"could not renew the home's lease before restarting "
                               f"PostgreSQL ({self.keeper.trouble}); stopping, since another "
                               "serve may take the home over")

    def _disk_full(self) -> bool:
        """Whether the disk holding the data is full; said once when it fills, and once
        when there is room again."""
        free = shutil.disk_usage(self.home.data).free
        if free >= DISK_FULL_BYTES:
            if "disk" in self.troubles:
                log.info("there is room on the disk again (%d MB free)", free // 2**20)
            self.troubles.discard("disk")
            return False
        self._once("disk", f"the disk holding {self.home.data} is full ({free // 2**20} MB "
                           "free): the server cannot store new trials, and workers wait. "
                           "Free some space there; everything carries on by itself")
        return True

    def _once(self, trouble: str, message: str, level: int = logging.ERROR) -> None:
        """Log a trouble when it starts, not at every check while it lasts."""
        if trouble not in self.troubles:
            self.troubles.add(trouble)
            log.log(level, "%s", message)

    def _withdraw(self, reason: str) -> None:
        """Withdraw the endpoint; a failed write (full disk) must not stop what follows."""
        try:
            endpoint.withdraw(self.home, reason)
        except OSError as exc:
            log.warning("could not withdraw the endpoint (%s); clients will find the server "
                        "does not answer", exc)

    def _restart(self) -> None:
        code = self.server.process.returncode
        self._withdraw(f"server died (exit code {code}); restarting")
        if self._disk_full():  # not a crash to count: wait for room, then start again
            until(lambda: self._stop_asked() or not self._disk_full(), 10**9, interval=5)
            if self.stop_reason:
                return
        else:
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < 600] + [now]
            if len(self.restarts) > self.max_restarts:
                raise ServerFailed(
                    f"PostgreSQL died {len(self.restarts)} times in 10 minutes (last exit "
                    f"code {code}); giving up. See {self.home.server_log}",
                    detail="server log (last lines):\n" + log_tail(self.home.server_log))
        self._renew_before_start()
        log.warning("PostgreSQL exited (code %s); restarting it", code)
        self.server.start()
        self._publish()

    def _backup_in_background(self) -> None:
        if self.backup_thread is not None and self.backup_thread.is_alive():
            return
        self.backup_thread = threading.Thread(target=self._backup, name="pgjob-backup",
                                              daemon=True)
        self.backup_thread.start()

    def _backup(self, timeout: float = 3600) -> None:
        try:
            made = backup.dump(self.home, self.bindir, host=str(self.server.socket_dir),
                               port=self.server.port, timeout=timeout)
            log.info("backup written: %s", made)
        except PgJobError as exc:
            log.warning("backup failed: %s", exc)

    def _ends_chain(self) -> bool:
        """`pgjob stop`, Ctrl-C or scancel end a renewal chain; the time limit does not."""
        if self.stop_reason in ("SIGUSR1", "SIGUSR2", TIME_LIMIT, ""):
            return False
        if self.stop_reason == "SIGTERM" and self.job_end is not None:
            return time.time() < self.job_end - WALLTIME_MARGIN
        return True

    def _shutdown(self) -> None:
        """Withdraw first, so no worker is sent here; a last backup; checkpoint; stop."""
        server = self.server
        if self.front is not None:
            self.front.pool.stop()  # first: no client reaches the server through it now
        if self.keeper is not None:  # found while a stop was under way, say
            self.lease_lost = self.lease_lost or bool(self.keeper.lost)
            self.fenced = self.fenced or (bool(self.keeper.lapsed) and not self.lease_lost)
        if self.lease_lost:
            # Another serve may be starting PostgreSQL on this data directory right now:
            # not one more write from ours (immediate shutdown), and the endpoint is
            # withdrawn only if it still names this server, never the new holder's.
            if server is not None:
                server.stop(fast_timeout=0)
            self._withdraw_if_ours("this server lost the home's lease")
            self.keeper.stop()
            return
        if self.fenced:
            # A taker may act SKEW s after the lapse: withdraw, then a fast shutdown (its
            # checkpoint takes a moment), and no last backup.
            self._withdraw_if_ours("this server could not renew the home's lease")
            if server is not None:
                server.stop(fast_timeout=lease.SKEW / 2, immediate_timeout=lease.SKEW / 4)
            self._release()
            return
        self._withdraw(self.stop_reason or "serve ended")
        if self.renew and self._ends_chain():
            cancelled = submit.cancel_successor(self.home)
            if cancelled:
                log.info("renewal chain ended: cancelled job %s", cancelled)
        if server is not None and server.process is not None:
            if server.alive():
                if self.backup_thread is not None:
                    self.backup_thread.join(60)
                self._backup(timeout=60)
                server.checkpoint()
            server.stop()
            state = cluster_state(self.bindir, self.home.data)
            if state == "shut down":
                log.info("PostgreSQL stopped cleanly (pg_controldata: shut down)")
            else:
                log.warning("PostgreSQL stopped, but pg_controldata says %r; the next start "
                            "will recover from the WAL", state)
        self._release()

    def _release(self) -> None:
        if self.keeper is not None:
            try:
                lease.release(self.home, self.keeper.stop())
            except OSError as exc:
                log.warning("could not release the lease (%s); it expires by itself", exc)

    def _withdraw_if_ours(self, reason: str) -> None:
        """Withdraw the endpoint if it still names this server's PostgreSQL."""
        published = endpoint.read_raw(self.home) or {}
        server = self.server
        if (server is not None and server.process is not None
                and published.get("state") == endpoint.SERVING
                and published.get("node") == self.job.node
                and published.get("pid") == server.process.pid):
            self._withdraw(reason)


def serve(home_option, *, host: str = "", interface: str = "",
          health_interval: float = 5.0, renew: bool = False) -> int:
    home = open_home(home_option).require()
    return Serve(home, host=host, interface=interface, health_interval=health_interval,
                 renew=renew).run()


@dataclass(frozen=True)
class StopReport:
    """What `pgjob stop` verified: `stopped` only when nothing serves the home any more."""

    stopped: bool
    message: str


def request_stop(home_option, wait: float = 0) -> StopReport:
    """Ask the serving process to stop, from any node that sees the home.

    Stopped means verified: the serve record is gone (or proven stale: its process is gone
    from this node, or the lease is no longer its) and no published endpoint answers.
    Nothing is deleted that is not proven stale; otherwise the report says what was seen.
    """
    home = open_home(home_option).require()
    if not read_record(home) and endpoint.read(home) is None:
        return StopReport(True, "stopped (nothing serves this home)")
    home.write(home.stop_request, f"{time.time()}\n")
    record = read_record(home)
    if record_is_live(record):
        try:
            os.kill(record["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    seen = [""]

    def verified() -> bool:
        seen[0] = still_serving(home)
        return not seen[0]

    if until(verified, wait, interval=0.2):
        return StopReport(True, "stopped")
    if not wait:
        return StopReport(False, "stop requested (use --wait SECONDS to wait for it)")
    return StopReport(False, f"asked to stop {wait:.0f} s ago, but {seen[0]}. The stop "
                             "request stays in place: serve acts on it when it runs again")


def still_serving(home: Home) -> str:
    """What still serves the home, in words; "" when verified that nothing does. A serve
    record proven stale is cleaned up, with the endpoint it left if that no longer answers."""
    record = read_record(home)
    if record and not _record_stale(home, record):
        published = endpoint.read(home)
        answers = published is not None and endpoint.check(published, timeout=3) is None
        where = f"pid {record.get('pid')} on node {record.get('node')}, job " \
                f"{record.get('job_id') or '-'}"
        if answers:
            return (f"the server still answers at {published.host}:{published.port} and its "
                    f"pgjob serve ({where}) still runs; it may be stopped (SIGSTOP) or hung: "
                    "see `pgjob status` and the job's log")
        if record.get("node") == scheduler.node_name():
            return f"its pgjob serve ({where}) still runs (shutting down, or hung)"
        return (f"its pgjob serve ({where}) may still run: its server does not answer, but "
                "pgjob cannot see processes on another node. If that job has ended, "
                "`pgjob break-lease`, then `pgjob stop` again")
    if record:
        home.serve_record.unlink(missing_ok=True)  # proven stale: its serve is gone
        home.stop_request.unlink(missing_ok=True)
        stale = endpoint.read(home)
        if (stale is not None and (stale.node, stale.job_id) == (record.get("node"),
                                                                 record.get("job_id"))
                and endpoint.check(stale, timeout=3) is not None):
            endpoint.withdraw(home, "its serve process died")
    published = endpoint.read(home)
    if published is not None and endpoint.check(published, timeout=3) is None:
        return (f"a server still answers at {published.host}:{published.port} (node "
                f"{published.node}, job {published.job_id or '-'}) with no pgjob serve "
                "record; see `pgjob status`")
    return ""


def _record_stale(home: Home, record: dict) -> bool:
    """True when the recorded serve is provably gone: on this node, its process is; on
    another, the lease is no longer its (released, broken, taken over)."""
    if record.get("node") == scheduler.node_name():
        return not record_is_live(record)
    try:
        current = lease.read_current(home)
    except OSError:
        return False  # cannot tell
    if current.lease is None:
        return current.generation == 0 and not current.problem
    try:
        return not current.lease.held_by(record["node"], record["pid"], record["create_time"])
    except KeyError:
        return False


def break_lease(home_option) -> str:
    """`pgjob break-lease`: release the lease of a holder that is gone but cannot be
    proven gone (a job killed on another node, a clock far ahead), so that a new serve can
    start at once. Refused while a serve of this home runs on this node or its published
    server answers, or while the lease is being renewed."""
    home = open_home(home_option).require()
    refuse_second_serve(home)
    return lease.break_held(home)
