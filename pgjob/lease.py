"""The lease that makes a home served by at most one server, whatever the nodes.

PostgreSQL's postmaster.pid only protects a data directory on one host. The lease lives in
the home on the shared filesystem: the holder renews it every few seconds; another serve
may take over only once it has expired and the old server no longer answers. Nodes' clocks
are assumed to agree to within a few seconds (NTP), which batch clusters ensure.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import psutil

from . import scheduler
from .errors import AlreadyServing, LeaseLost
from .home import Home
from .waiting import until

log = logging.getLogger("pgjob.lease")

TTL = 30.0  # seconds a lease stays valid without renewal


@dataclass(frozen=True)
class Lease:
    token: str
    node: str  # the holder's node name (the scheduler's, else the host name)
    job_id: str
    pid: int
    create_time: float
    generation: int
    renewed_at: float
    ttl: float = TTL

    def expired(self, now: float | None = None) -> bool:
        return (now or time.time()) > self.renewed_at + self.ttl

    def holder_gone(self) -> bool:
        """True when the holder ran on this node and its process is gone: no need to wait."""
        if self.node != scheduler.node_name():
            return False
        try:
            return psutil.Process(self.pid).create_time() != self.create_time
        except psutil.Error:
            return True

    def describe(self) -> str:
        return (f"node {self.node}, job {self.job_id or '-'}, pid {self.pid}, renewed "
                f"{time.time() - self.renewed_at:.0f} s ago")


def read(home: Home) -> Lease | None:
    try:
        data = json.loads(home.lease_file.read_text())
        return Lease(**{f.name: data[f.name] for f in dataclasses.fields(Lease)})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(home: Home, lease: Lease) -> None:
    home.write(home.lease_file, json.dumps(dataclasses.asdict(lease), indent=2) + "\n")


@contextmanager
def _exclusive(home: Home, timeout: float = 15.0, stale_after: float = 10.0) -> Iterator[None]:
    """Only one serve decides about the lease at a time: O_EXCL creation of a lock file is
    atomic, on NFS too. A lock older than `stale_after` s was left by a serve that died."""
    lock = home.run / "lease.lock"

    def take() -> bool:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return True
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > stale_after:
                    lock.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False

    if not until(take, timeout, interval=0.05):
        raise AlreadyServing(f"another pgjob serve is taking this home's lease ({lock} is "
                             "held); leaving the home to it")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _wait_until_free(home: Home, current: Lease, wait_for_expiry: float) -> None:
    """Watch a live lease: renewed means a live server (refuse), expired means free."""
    log.info("the home's lease is held (%s); waiting to see whether it is renewed",
             current.describe())

    def settled() -> str:
        now = read(home)
        if now is None or now.expired() or now.holder_gone():
            return "free"
        if now.renewed_at != current.renewed_at or now.token != current.token:
            return "renewed"
        return ""

    if until(settled, wait_for_expiry, interval=0.5) != "free":
        holder = read(home) or current
        raise AlreadyServing(
            f"another pgjob serve holds this home's lease ({holder.describe()}); two "
            "servers on one data directory would corrupt it. Stop it with `pgjob stop` "
            "first, or wait for its job to end")


def _is_free(current: Lease | None) -> bool:
    return current is None or current.expired() or current.holder_gone()


def acquire(home: Home, job_id: str, wait_for_expiry: float = TTL + 10) -> Lease:
    """Take the lease, waiting for a dead holder's lease to expire.

    A lease that is renewed while we watch belongs to a live server: refuse at once.
    """
    current = read(home)
    if not _is_free(current):
        _wait_until_free(home, current, wait_for_expiry)
    with _exclusive(home):
        current = read(home)  # again, under the lock: another serve may have been quicker
        if not _is_free(current):
            raise AlreadyServing(f"another pgjob serve took this home's lease first "
                                 f"({current.describe()}); leaving the home to it")
        me = psutil.Process()
        mine = Lease(token=secrets.token_hex(16), node=scheduler.node_name(),
                     job_id=job_id, pid=me.pid, create_time=me.create_time(),
                     generation=(current.generation if current else 0) + 1,
                     renewed_at=time.time())
        _write(home, mine)
    return mine


def renew(home: Home, lease: Lease) -> Lease:
    """Extend our lease; LeaseLost if someone else holds it now."""
    current = read(home)
    if current is None or current.token != lease.token:
        holder = current.describe() if current else "no readable lease"
        raise LeaseLost(f"this server lost the home's lease (now: {holder}); stopping at once "
                        "so that two servers never write the same data directory")
    renewed = dataclasses.replace(lease, renewed_at=time.time())
    _write(home, renewed)
    return renewed


def release(home: Home, lease: Lease) -> None:
    """Give the lease up, if it is still ours, so a successor need not wait for expiry."""
    current = read(home)
    if current is not None and current.token == lease.token:
        _write(home, dataclasses.replace(lease, renewed_at=0.0))
