"""The files by which one serve of a home is known and stopped, from any node.

- the serve record (run/serve.json): which process on which node serves the home; a second
  serve is refused while it lives or while a published server answers;
- the stop request (run/stop-request): `pgjob stop` writes it (and signals the serve when
  it runs on this node), serve acts on it, and `request_stop` verifies that nothing serves
  the home any more, cleaning up only what is proven stale;
- `pgjob break-lease`, for a holder that is gone but cannot be proven gone.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import psutil

from . import endpoint, lease
from .proc import same_process
from .errors import AlreadyServing
from .home import Home, open_home
from .schedulers import node_name
from .waiting import until


def own_record() -> dict:
    """This process, as the serve record and serve's private directory name it."""
    me = psutil.Process()
    return {"node": node_name(), "pid": me.pid, "create_time": me.create_time()}


def record_is_live(record: dict) -> bool:
    """True when the serve process the record names still runs on this node."""
    return (record.get("node") == node_name()
            and same_process(record.get("pid"), record.get("create_time")))


def read_record(home: Home) -> dict:
    return home.read_record(home.serve_record)


def write_record(home: Home, job_id: str) -> None:
    """Say that this process serves the home now; a stop request from before is void."""
    home.write_record(home.serve_record, {**own_record(), "job_id": job_id})
    home.stop_request.unlink(missing_ok=True)


def clear(home: Home) -> None:
    """What a serve leaves when it ends: nothing."""
    home.serve_record.unlink(missing_ok=True)
    home.stop_request.unlink(missing_ok=True)


def stop_requested(home: Home) -> bool:
    return home.stop_request.exists()


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
        if record.get("node") == node_name():
            return f"its pgjob serve ({where}) still runs (shutting down, or hung)"
        return (f"its pgjob serve ({where}) may still run: its server does not answer, but "
                "pgjob cannot see processes on another node. If that job has ended, "
                "`pgjob break-lease`, then `pgjob stop` again")
    if record:
        clear(home)  # proven stale: its serve is gone
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
    if record.get("node") == node_name():
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
