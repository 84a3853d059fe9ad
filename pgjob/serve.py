"""`pgjob serve`: the keep-alive policy that is the body of a batch job.

Take the home's lease, start this home's server on this node (instance.py), publish the
endpoint, and keep it answering: renew the lease, sweep stale trials, take backups,
restart a server that died, queue the next job of a renewal chain, stop by itself before
a time limit that no signal announces. On any stop signal: withdraw the endpoint first,
take a last backup, then shut the server down cleanly and give the lease up.

The decisions are the small pure functions at the top; `Serve` carries them out.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import (backup, binaries, control, endpoint, instance, lease, netinfo, passwords,
               pooler, schedulers, submission)
from .cluster import cluster_state, log_tail, private_socket_dir
from .errors import LeaseExpired, LeaseLost, PgJobError, ServerFailed
from .home import Home, open_home
from .instance import Instance
from .schedulers import Job
from .schema import socket_url
from .settings import Settings
from .trials import StaleTrialSweeper, refresh_heartbeats
from .waiting import until

log = logging.getLogger("pgjob.serve")

# SIGUSR2 is what LSF sends when a job reaches its run limit (ten minutes before SIGKILL).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
WALLTIME_MARGIN = 300  # a SIGTERM this close to the job's end is the time limit, not a cancel
TIME_LIMIT = "the job's time limit is near"  # the reason of a self-scheduled stop
STOP_REQUESTED = "pgjob stop"
DISK_FULL_BYTES = 64 * 1024 * 1024
RESTART_WINDOW = 600  # more than max_restarts crashes in this many seconds: give up
# The signals that say the job's time is up (Slurm's --signal, LSF's run limit): the chain
# goes on after them.
TIME_UP = ("SIGUSR1", "SIGUSR2", TIME_LIMIT)


# The decisions, as pure functions of what serve knows.

def stop_reason(current: str, *, stop_requested: bool, stop_at: float | None,
                now: float) -> str:
    """Why serving ends now ("" while it goes on): the first reason seen stays."""
    if current:
        return current
    if stop_requested:
        return STOP_REQUESTED
    if stop_at is not None and now >= stop_at:
        return TIME_LIMIT
    return ""


def ends_chain(reason: str, job_end: float | None, now: float) -> bool:
    """`pgjob stop`, Ctrl-C or scancel end a renewal chain; the time limit does not. A
    SIGTERM within WALLTIME_MARGIN of the job's end is the time limit."""
    if reason in TIME_UP or not reason:
        return False
    if reason == "SIGTERM" and job_end is not None:
        return now < job_end - WALLTIME_MARGIN
    return True


def own_stop_time(job_end: float, now: float, stop_margin: float) -> float:
    """When to stop by itself where no signal comes before the time limit (PBS): a margin
    before the end, so the last backup and a clean shutdown happen before the kill. A job
    with less than twice the margin left serves half of it (a chain of short jobs must not
    stop as soon as each starts)."""
    return job_end - min(stop_margin, (job_end - now) / 2)


def recent_restarts(restarts: list[float], now: float) -> list[float]:
    """The crash restarts within RESTART_WINDOW of `now`, this one included."""
    return [t for t in restarts if now - t < RESTART_WINDOW] + [now]


def shutdown_kind(*, lease_lost: bool, fenced: bool) -> str:
    """How to shut down: "immediate" when another serve holds the home (not one more write),
    "fenced" when the lease could not be renewed (a taker may act soon: fast, no backup),
    else "clean" (withdraw, last backup, checkpoint, fast shutdown)."""
    if lease_lost:
        return "immediate"
    return "fenced" if fenced else "clean"


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
    settings: Settings | None = None  # read once, at run
    job: Job | None = None
    node: Instance | None = None  # this home's server on this node
    keeper: lease.Keeper | None = None  # holds the home's lease and renews it
    lease_lost: bool = False  # proven: another serve holds the home now
    fenced: bool = False  # the lease could not be renewed for its ttl
    job_end: float | None = None
    stop_at: float | None = None  # a self-scheduled stop, where no signal warns of the end
    backup_thread: threading.Thread | None = None
    troubles: set[str] = field(default_factory=set)

    @property
    def server(self):
        return self.node.server if self.node is not None else None

    def run(self) -> int:
        home = self.home
        self.settings = settings = home.settings()
        bindir = binaries.find(settings.pg_bin)
        pooler_bin = pooler.require() if pooler.wanted(settings.pooler) else None
        address = netinfo.address(self.host, self.interface)  # refused before the lease
        control.refuse_second_serve(home)
        self.job = job = schedulers.current()
        self._install_signals()
        held = lease.acquire(home, job.job_id, ttl=settings.lease_ttl,
                             before_taking=lambda: control.refuse_second_serve(home))
        for stale in instance.remove_stale_private_dirs(os.geteuid()):
            log.info("removed %s, left on this node by a serve that is gone", stale)
        socket_dir = private_socket_dir()
        try:
            instance.mark_private_dir(socket_dir, control.own_record())
            self.keeper = lease.Keeper(home, held, fence=self._fence_now)
            self.keeper.start()
            control.write_record(home, job.job_id)
            note = instance.set_aside_stale_pidfile(home.data)
            if note:
                log.warning("%s", note)
            self.node = Instance(home, settings, bindir, address, job, socket_dir,
                                 pooler_bin=pooler_bin)
            for warning in self.node.start():
                log.warning("%s", warning)
            if home.pending_passfile.exists():  # a rotation cut short: settle it first
                passwords.finish_rotation(home, passwords.socket_probe(
                    socket_dir, self.server.port, settings))
            self._publish()
            log.info("serving %s at %s:%d (node %s, job %s%s)", home.path, address,
                     self.node.port, job.node, job.job_id or "-",
                     ", through pgbouncer" if self.node.front else "")
            self._start_chain()
            return self._keep_alive(socket_dir)
        except LeaseLost as exc:
            self.fenced = isinstance(exc, LeaseExpired)
            self.lease_lost = not self.fenced
            raise
        finally:
            self._shutdown()
            shutil.rmtree(socket_dir, ignore_errors=True)
            control.clear(home)

    def _install_signals(self) -> None:
        def handler(signum, _frame):
            self.stop_reason = self.stop_reason or signal.Signals(signum).name
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)

    def _publish(self) -> None:
        with self.node.study_database() as conn:
            refreshed = refresh_heartbeats(conn)
        if refreshed:
            log.info("gave %d running trials a fresh heartbeat after the restart", refreshed)
        endpoint.publish(self.home, self.node.describe(endpoint.last_generation(self.home) + 1))

    def _start_chain(self) -> None:
        """With --renew in a batch job: queue the job that takes over when this one ends."""
        self.job_end = self.job.end_time
        self._schedule_own_stop()
        if not self.renew:
            return
        if not schedulers.get(self.job.scheduler).submit_command or not self.job.job_id:
            log.warning("--renew needs a Slurm, PBS or LSF job; serving without renewal")
            return
        successor = submission.submit_successor(self.home, self.job.job_id, self.job.scheduler)
        log.info("renewal: job %s will take over when this job ends", successor)

    def _schedule_own_stop(self) -> None:
        if self.job.warned_before_end:
            return
        if self.job_end is None:
            log.warning("%s gave no end time for job %s, and sends no signal before the "
                        "time limit: serving without a self-scheduled stop, so the job may "
                        "be killed at its walltime (check `qstat -f %s`)",
                        self.job.scheduler.upper(), self.job.job_id, self.job.job_id)
            return
        now = time.time()
        self.stop_at = own_stop_time(self.job_end, now, self.settings.stop_margin)
        log.info("%s sends no signal before the time limit: stopping by itself at %s, "
                 "%.0f s before the job's end", self.job.scheduler.upper(),
                 time.strftime("%H:%M:%S", time.localtime(self.stop_at)),
                 self.job_end - self.stop_at)

    def _stop_asked(self) -> bool:
        self.stop_reason = stop_reason(self.stop_reason,
                                       stop_requested=control.stop_requested(self.home),
                                       stop_at=self.stop_at, now=time.time())
        return bool(self.stop_reason)

    def _keep_alive(self, socket_dir: Path) -> int:
        sweeper = StaleTrialSweeper(self.home, self.settings,
                                    socket_url(socket_dir, self.server.port, self.settings,
                                               self.home.app_passfile),
                                    self.node.study_database)
        sweep = Every(self.settings.grace_period / 2, sweeper.sweep)
        backup_due = Every(self.settings.backup_interval, self._backup_in_background,
                           due=time.time() + self.settings.backup_interval)  # not at start
        try:
            while True:
                if until(self._stop_asked, self.health_interval, interval=0.25):
                    log.info("stopping: %s", self.stop_reason)
                    return 0
                self._check_lease()
                self._disk_full()
                if self.node.check_pooler():
                    self._publish()  # pgbouncer came back on another port
                if not self.server.alive():
                    self._restart()
                    continue
                if not self.server.answers():
                    log.warning("the server is running but did not answer a query within "
                                "5 s; it may be overloaded (see %s)", self.home.server_log)
                    continue
                for chore in (sweep, backup_due):
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
            server.send(signal.SIGQUIT)
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
        code = self.server.returncode
        self._withdraw(f"server died (exit code {code}); restarting")
        if self._disk_full():  # not a crash to count: wait for room, then start again
            until(lambda: self._stop_asked() or not self._disk_full(), 10**9, interval=5)
            if self.stop_reason:
                return
        else:
            self.restarts = recent_restarts(self.restarts, time.monotonic())
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
            made = backup.dump(self.home, self.server.bindir, host=str(self.server.socket_dir),
                               port=self.server.port, timeout=timeout)
            log.info("backup written: %s", made)
        except PgJobError as exc:
            log.warning("backup failed: %s", exc)

    def _shutdown(self) -> None:
        """Withdraw first, so no worker is sent here; a last backup; checkpoint; stop."""
        server = self.server
        if self.node is not None:
            self.node.stop_pooler()  # first: no client reaches the server through it now
        if self.keeper is not None:  # found while a stop was under way, say
            self.lease_lost = self.lease_lost or bool(self.keeper.lost)
            self.fenced = self.fenced or (bool(self.keeper.lapsed) and not self.lease_lost)
        kind = shutdown_kind(lease_lost=self.lease_lost, fenced=self.fenced)
        if kind == "immediate":
            # Another serve may be starting PostgreSQL on this data directory right now:
            # not one more write from ours (immediate shutdown), and the endpoint is
            # withdrawn only if it still names this server, never the new holder's.
            if server is not None:
                server.stop(fast_timeout=0)
            self._withdraw_if_ours("this server lost the home's lease")
            self.keeper.stop()
            return
        if kind == "fenced":
            # A taker may act SKEW s after the lapse: withdraw, then a fast shutdown (its
            # checkpoint takes a moment), and no last backup.
            self._withdraw_if_ours("this server could not renew the home's lease")
            if server is not None:
                server.stop(fast_timeout=lease.SKEW / 2, immediate_timeout=lease.SKEW / 4)
            self._release()
            return
        self._withdraw(self.stop_reason or "serve ended")
        if self.renew and ends_chain(self.stop_reason, self.job_end, time.time()):
            cancelled = submission.cancel_successor(self.home)
            if cancelled:
                log.info("renewal chain ended: cancelled job %s", cancelled)
        if server is not None and server.process is not None:
            if server.alive():
                if self.backup_thread is not None:
                    self.backup_thread.join(60)
                self._backup(timeout=60)
                server.checkpoint()
            server.stop()
            state = cluster_state(server.bindir, self.home.data)
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
        if self.node is not None and self.node.is_published(endpoint.read_raw(self.home) or {}):
            self._withdraw(reason)


def serve(home_option, *, host: str = "", interface: str = "",
          health_interval: float = 5.0, renew: bool = False) -> int:
    home = open_home(home_option).require()
    return Serve(home, host=host, interface=interface, health_interval=health_interval,
                 renew=renew).run()
