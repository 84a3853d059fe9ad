"""The lease that makes a home served by at most one server, whatever the nodes.

PostgreSQL's postmaster.pid only protects a data directory on one host. The lease lives in
the home on the shared filesystem, as a series of generation files that are never
rewritten: `run/lease-G.json` is generation G, and the current lease is the highest
generation present. Every change (taking, renewing, releasing, breaking) creates the next
generation by linking a complete temp file to its name; `link` fails when the name exists,
atomically (NFS, Lustre and GPFS included), so of two serves that both mean to write
generation G+1 exactly one succeeds, and no write ever overwrites another's. No lock file,
no judging by age.

Timing, with `ttl` the holder's and SKEW the margin for clocks and stalls:
- the holder renews every ttl/RENEWALS_PER_TTL s; if it could not renew for `ttl` s by its
  own monotonic clock, it stops serving (it fences itself);
- a taker may take over a lease that is released, whose holder is provably gone (same
  node, pid and start time), that expired by wall clock (now > renewed_at + ttl + SKEW),
  or that it saw unchanged for ttl + SKEW s by its own monotonic clock, whatever the
  clocks say (a lease stamped in the future delays a take-over by that window, no more).

docs/architecture.md says what this assumes of the filesystem.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import schedulers
from .errors import AlreadyServing, LeaseLost, PgJobError
from .home import Home, fsync_folder, json_object
from .proc import same_process
from .waiting import until

log = logging.getLogger("pgjob.lease")

TTL = 30.0  # seconds a lease stays valid without renewal (the `lease_ttl` setting)
MAX_TTL = 3600.0
SKEW = 10.0  # how far nodes' clocks may disagree; also the fenced holder's time to stop
RENEWALS_PER_TTL = 6  # renewals a holder attempts within one ttl
RENEWAL_SLACK = 5.0  # how late a live holder's renewal may come (a slow filesystem)
KEEP = 3  # generations kept behind the current one, for readers that listed a moment ago
# A full disk (or quota) stops every writer of the home alike: a taker cannot write its
# lease either, so a holder that fails only with these is not fenced (see Keeper).
EVERYONES = (errno.ENOSPC, errno.EDQUOT)
NAME = re.compile(r"lease-(\d+)\.json")
BROKEN = "broken-"  # the token of a generation written by `pgjob break-lease`
BREAK_HINT = ("if you are sure no server of this home runs any more, `pgjob break-lease` "
              "releases it")


@dataclass(frozen=True)
class Lease:
    token: str
    node: str  # the holder's node name (the scheduler's, else the host name)
    job_id: str
    pid: int
    create_time: float
    generation: int
    renewed_at: float  # the holder's wall clock when it wrote this generation
    ttl: float = TTL
    released: bool = False

    def expired(self, now: float | None = None) -> bool:
        """Expired by this node's wall clock, with SKEW for the clocks' disagreement."""
        return (time.time() if now is None else now) > self.renewed_at + self.ttl + SKEW

    def _holder_runs_here(self) -> bool | None:
        """Whether the holder's process runs on this node; None when it ran elsewhere."""
        if self.node != schedulers.node_name():
            return None
        return same_process(self.pid, self.create_time)

    def holder_gone(self) -> bool:
        """True when the holder ran on this node and its process is gone: no need to wait."""
        return self._holder_runs_here() is False

    def holder_alive_here(self) -> bool:
        """True when the holder runs on this node: alive, whatever its lease says."""
        return self._holder_runs_here() is True

    def held_by(self, node: str, pid: int, create_time: float) -> bool:
        return not self.released and (self.node, self.pid, self.create_time) == (
            node, pid, create_time)

    def describe(self) -> str:
        age = time.time() - self.renewed_at
        verb = ("broken with `pgjob break-lease`" if self.token.startswith(BROKEN) else
                "released" if self.released else "renewed")
        when = (f"stamped {-age:.0f} s in the future by its holder's clock" if age < -SKEW
                else f"{verb} {max(age, 0):.0f} s ago")
        return (f"generation {self.generation}, node {self.node}, job {self.job_id or '-'}, "
                f"pid {self.pid}, {when}")


@dataclass(frozen=True)
class Current:
    """The highest generation present: 0 when no lease was ever taken; `lease` None when
    that file cannot be understood (`problem` says why)."""

    generation: int
    lease: Lease | None
    problem: str = ""

    def describe(self) -> str:
        return self.lease.describe() if self.lease else self.problem or "no lease"


def _path(home: Home, generation: int) -> Path:
    return home.run / f"lease-{generation}.json"


def _parse(raw: bytes, generation: int) -> Lease:
    """A lease from a file's bytes; ValueError saying what is wrong with it."""
    data = json_object(raw.decode())
    kinds = {"token": str, "node": str, "job_id": str, "pid": int, "create_time": float,
             "renewed_at": float, "ttl": float, "released": bool}
    fields = {}
    for name, kind in kinds.items():
        value = data.get(name, False if name == "released" else None)
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, kind) if kind is str else
              isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and (kind is float or float(value).is_integer()))
        if not ok:
            raise ValueError(f"{name} is {value!r}")
        fields[name] = int(value) if kind is int else value
    if not 0 < fields["ttl"] <= MAX_TTL:
        raise ValueError(f"ttl is {fields['ttl']!r}")
    if not 0 < fields["pid"] < 2**31:
        raise ValueError(f"pid is {fields['pid']!r}")
    return Lease(generation=generation, **fields)


def _generations(home: Home) -> list[int]:
    """The generations present, in order; OSError when run/ cannot be listed."""
    return sorted(int(m.group(1)) for name in os.listdir(home.run)
                  if (m := NAME.fullmatch(name)))


def _read_generation(home: Home, generation: int) -> Current:
    """One generation's file; OSError when it cannot be read (FileNotFoundError: gone)."""
    path = _path(home, generation) if generation else home.lease_file
    raw = path.read_bytes()
    try:
        return Current(generation, _parse(raw, generation))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError too
        return Current(generation, None, f"{path} is not a valid lease ({exc})")


def read_current(home: Home) -> Current:
    """The current lease. OSError when it cannot be read now (a passing NFS error, say)."""
    for _ in range(5):
        present = _generations(home)
        if not present and not home.lease_file.exists():
            return Current(0, None)
        try:
            return _read_generation(home, present[-1] if present else 0)
        except FileNotFoundError:
            continue  # pruned or replaced between listing and reading: look again
    raise OSError(f"the lease files in {home.run} keep changing while read")


def read(home: Home) -> Lease | None:
    """The current lease, or None (none, unreadable or not valid): for a quick look."""
    try:
        return read_current(home).lease
    except OSError:
        return None


def _create(home: Home, lease: Lease) -> None:
    """Write generation `lease.generation`, complete, or not at all: FileExistsError when
    that generation exists already (another serve wrote it first)."""
    final = _path(home, lease.generation)
    fd, tmp = tempfile.mkstemp(dir=home.run, prefix=".lease-")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(dataclasses.asdict(lease), indent=2) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.link(tmp, final)
    finally:
        os.unlink(tmp)
    fsync_folder(home.run)


def _prune(home: Home, lease: Lease) -> None:
    """Remove generations well behind `lease`, and the lease.json of pgjob before
    generation files (read as generation 0); best effort."""
    try:
        for g in _generations(home):
            if g < lease.generation - KEEP:
                _path(home, g).unlink(missing_ok=True)
        home.lease_file.unlink(missing_ok=True)
    except OSError:
        pass


def _free_because(current: Current) -> str:
    """Why a taker may take the lease over now, or "" when it may not (yet)."""
    held = current.lease
    if current.generation == 0 and held is None and not current.problem:
        return "no serve held it before"
    if held is None:
        return ""
    if held.released:
        return f"its holder released it ({held.describe()})"
    if held.holder_gone():
        return f"its holder is gone ({held.describe()})"
    if held.expired():
        return (f"it expired ({held.describe()}; valid for {held.ttl:.0f} s plus "
                f"{SKEW:.0f} s for clock skew)")
    return ""


class _Watch:
    """Watching a held lease: renewed (a live server) refuses; unchanged for its ttl plus
    SKEW on our monotonic clock, whatever its clock said, frees it."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.first: Current | None = None
        self.since = 0.0
        self.failing_since: float | None = None

    def look(self) -> tuple[Current, str] | None:
        now = time.monotonic()
        try:
            current = read_current(self.home)
        except OSError as exc:
            return self._cannot_read(exc, now)
        self.failing_since = None
        free = _free_because(current)
        if free:
            return self._unless_alive_here(current), free
        if self.first is None:
            self.first, self.since = current, now
            self._say_waiting(current)
        elif current != self.first:  # a new generation (or a legacy lease.json rewritten)
            raise AlreadyServing(
                f"another pgjob serve holds this home's lease and renews it "
                f"({current.describe()}); two servers on one data directory would corrupt "
                f"it. Stop it with `pgjob stop` first, or wait for its job to end; "
                f"{BREAK_HINT}")
        elif now - self.since > self._window(current):
            return self._unless_alive_here(current), (
                f"it was not renewed for {now - self.since:.0f} s while watched "
                f"({current.describe()})")
        return None

    @staticmethod
    def _unless_alive_here(current: Current) -> Current:
        """A holder seen running on this node holds, whatever its lease says (stopped or
        hung, its PostgreSQL may still write)."""
        held = current.lease
        if held is not None and not held.released and held.holder_alive_here():
            raise AlreadyServing(
                f"the home's lease is not renewed, but its holder still runs on this node "
                f"({current.describe()}): it may be stopped or hung. Stop it with "
                f"`pgjob stop`, or `kill {held.pid}`, first")
        return current

    @staticmethod
    def _window(current: Current) -> float:
        return (current.lease.ttl if current.lease else TTL) + SKEW

    def _say_waiting(self, current: Current) -> None:
        held = current.lease
        future = held is not None and held.renewed_at > time.time() + SKEW
        log.info("the home's lease is held (%s); watching it for up to %.0f s: renewed means "
                 "a live server, unchanged means its holder is gone%s", current.describe(),
                 self._window(current),
                 " (it is stamped in the future: its holder's clock is ahead of this "
                 "node's; it is taken over if not renewed within that time, or at once "
                 "with `pgjob break-lease`)" if future else "")

    def _cannot_read(self, exc: OSError, now: float) -> None:
        if self.failing_since is None:
            self.failing_since = now
            log.warning("cannot read the home's lease (%s); trying again", exc)
        if now - self.failing_since > TTL + SKEW:
            raise PgJobError(f"cannot read the home's lease in {self.home.run} ({exc}), so "
                             "cannot tell whether another server holds this home; fix the "
                             "filesystem or the folder's permissions, then serve again")


def acquire(home: Home, job_id: str, ttl: float = TTL,
            before_taking: Callable[[], None] = lambda: None) -> Lease:
    """Take the lease: at once when it is free, else after watching it (see _Watch).

    `before_taking` runs just before the take-over and raises to refuse it (serve checks
    there that no published server answers). AlreadyServing when another serve holds it
    or took it first.
    """
    found = until(_Watch(home).look, MAX_TTL + SKEW + 60, interval=0.5)
    if found is None:
        raise AlreadyServing(f"the home's lease in {home.run} did not come free; {BREAK_HINT}")
    current, why = found
    before_taking()
    me = psutil.Process()
    mine = Lease(token=secrets.token_hex(16), node=schedulers.node_name(), job_id=job_id,
                 pid=me.pid, create_time=me.create_time(), generation=current.generation + 1,
                 renewed_at=time.time(), ttl=ttl)
    try:
        _create(home, mine)
    except FileExistsError:
        raise AlreadyServing(f"another pgjob serve took this home's lease first "
                             f"({describe_current(home)}); leaving the home to it") from None
    except OSError as exc:
        raise PgJobError(f"could not write the home's lease in {home.run}: {exc}; make "
                         "room on that filesystem (or fix its permissions), then serve "
                         "again") from None
    if current.generation:
        log.info("took the home's lease (generation %d): %s", mine.generation, why)
    _prune(home, mine)
    return mine


def describe_current(home: Home) -> str:
    try:
        return read_current(home).describe()
    except OSError as exc:
        return f"the lease cannot be read: {exc}"


def renew(home: Home, lease: Lease) -> Lease:
    """Write the next generation of our lease.

    LeaseLost when it is provably not ours any more: another generation was written after
    ours (a take-over, `pgjob break-lease`), or our own file names another holder.
    OSError for what may pass or cannot be judged (unreadable, invalid or missing own
    file): the caller retries while the lease lasts, and stops serving after its ttl.
    """
    own = _read_generation(home, lease.generation)  # FileNotFoundError: handled below
    if own.lease is None:
        raise OSError(f"cannot check this server's lease: {own.problem}")
    if own.lease.token != lease.token:
        raise _lost(f"generation {lease.generation} names another holder "
                    f"({own.describe()})")
    following = dataclasses.replace(lease, generation=lease.generation + 1,
                                    renewed_at=time.time())
    try:
        _create(home, following)
    except FileExistsError:
        there = _read_generation(home, following.generation)
        if there.lease is None or there.lease.token != lease.token:
            raise _lost(f"now: {there.describe()}") from None
        following = there.lease  # an earlier attempt of ours got through after all
    if max(_generations(home), default=0) > following.generation:
        raise _lost(f"now: {describe_current(home)}")
    _prune(home, following)
    return following


def _lost(detail: str) -> LeaseLost:
    return LeaseLost(f"this server lost the home's lease ({detail}); stopping at once so "
                     "that two servers never write the same data directory")


def release(home: Home, lease: Lease) -> None:
    """Give the lease up, if it is still ours, so a successor need not wait for expiry."""
    for _ in range(3):
        gone = dataclasses.replace(lease, generation=lease.generation + 1,
                                   renewed_at=time.time(), released=True)
        try:
            _create(home, gone)
            _prune(home, gone)
            return
        except FileExistsError:
            there = _read_generation(home, gone.generation).lease
            if there is None or there.token != lease.token or there.released:
                return  # another serve holds it now: nothing of ours to give up
            lease = there  # our own renewal got there first


def break_held(home: Home) -> str:
    """Release the current lease on its holder's behalf (`pgjob break-lease`); the caller
    has checked that no server of this home answers or runs on this node.

    Watches the lease for one renewal period first: renewed means a live holder (refused).
    Returns what was broken. A holder that comes back finds a later generation and stops.
    """
    try:
        current = read_current(home)
    except OSError as exc:
        raise PgJobError(f"cannot read the home's lease in {home.run}: {exc}") from None
    if current.generation == 0 or (current.lease and current.lease.released):
        return "the home's lease is not held; nothing to break"
    held = current.lease
    if held and held.holder_alive_here():
        raise AlreadyServing(f"the lease's holder, pid {held.pid}, still runs on this node "
                             f"({held.describe()}); stop it with `pgjob stop` instead")
    ttl = held.ttl if held else TTL
    changed = until(lambda: read(home) != held, ttl / RENEWALS_PER_TTL + RENEWAL_SLACK,
                    interval=0.2)
    if changed:
        raise AlreadyServing(f"the home's lease changed while watched "
                             f"({describe_current(home)}): a serve holds it; stop it with "
                             "`pgjob stop` instead")
    me = psutil.Process()
    broken = Lease(token=BROKEN + secrets.token_hex(8), node=schedulers.node_name(),
                   job_id="", pid=me.pid, create_time=me.create_time(),
                   generation=current.generation + 1, renewed_at=time.time(),
                   released=True)
    try:
        _create(home, broken)
    except FileExistsError:
        raise AlreadyServing("the home's lease was renewed or taken just now "
                             f"({describe_current(home)}); nothing was broken") from None
    _prune(home, broken)
    return f"released the home's lease ({current.describe()})"


class Keeper:
    """Renews a held lease in a thread of its own, so that a long start, backup or
    shutdown never lets it lapse, and says what it found.

    `lost`: proven lost (serving must end at once); `lapsed`: renewals failed or hung for
    the whole ttl (serving must end: a taker may act SKEW s later), unless they fail with
    a full disk or quota, which keep a taker from writing its lease too; `trouble`: the last
    passing failure. A second thread, which never touches the filesystem, calls `fence`
    when the server must stop writing and the main loop may be too busy (or too stuck on
    the same filesystem) to see it: at once when lost, SKEW/2 s after a lapse.
    A renewal that succeeds after a stall is safe: it is an exclusive create, which fails
    if a taker wrote that generation meanwhile.
    """

    def __init__(self, home: Home, lease: Lease, fence: Callable[[], None]) -> None:
        self.home, self.lease, self.fence = home, lease, fence
        self.lost = ""
        self.lapsed = ""
        self.trouble = ""
        self.renewed_at = time.monotonic()  # when our last successful renewal began
        self._failing = False
        self._everyones = False  # the last failure stops every writer alike (a full disk)
        self._attempt_began: float | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._fenced = False
        self._threads = [threading.Thread(target=self._renewing, name="pgjob-lease",
                                          daemon=True),
                         threading.Thread(target=self._watching, name="pgjob-fence",
                                          daemon=True)]

    @property
    def period(self) -> float:
        return self.lease.ttl / RENEWALS_PER_TTL

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> Lease:
        """Stop renewing; the last lease we wrote (for release)."""
        self._done.set()
        for thread in self._threads:
            thread.join(self.lease.ttl)
        return self.lease

    def renew_now(self) -> None:
        """Renew at once (before PostgreSQL starts again); LeaseLost, or OSError."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost)
            began = self._attempt_began = time.monotonic()
            try:
                self.lease = renew(self.home, self.lease)
            except LeaseLost as exc:
                self.lost = str(exc)
                raise
            except OSError as exc:
                self.trouble, self._failing = str(exc) or type(exc).__name__, True
                self._everyones = exc.errno in EVERYONES
                raise
            finally:
                self._attempt_began = None
            self.renewed_at, self.trouble, self.lapsed, self._failing = began, "", "", False

    def _renewing(self) -> None:
        while not self._done.wait(self.period):
            try:
                self.renew_now()
            except LeaseLost:
                return
            except OSError:
                pass  # judged by _watching; retried at the next period
            except Exception as exc:  # a bug here must not leave the lease unwatched
                self.trouble, self._failing = f"{type(exc).__name__}: {exc}", True
                log.exception("renewing the lease failed")

    def _watching(self) -> None:
        while not self._done.wait(1.0):
            if self.lost:
                self._fence_once()
                return
            self._judge(time.monotonic())

    def _judge(self, now: float) -> None:
        began = self._attempt_began
        hung = began is not None and now - began > self.period
        silent = now - self.renewed_at
        if not (self._failing or hung) or silent <= self.lease.ttl:
            return
        if self._everyones and not hung:
            return  # a taker cannot write its lease either: no need to fence
        if not self.lapsed:
            cause = (f"last error: {self.trouble}" if self._failing and not hung else
                     f"a renewal has not returned for {now - began:.0f} s")
            self.lapsed = (f"this server could not renew the home's lease for {silent:.0f} s "
                           f"({cause}); another serve may take the home over {SKEW:.0f} s "
                           "after that, so this one stops")
        if silent > self.lease.ttl + SKEW / 2:
            self._fence_once()

    def _fence_once(self) -> None:
        if not self._fenced:
            self._fenced = True
            self.fence()
