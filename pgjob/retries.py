"""Retrying a storage call across a lost connection, without doing anything twice.

When the server restarts or moves, a call fails with a lost connection; the call is then
repeated once the server is back (see optuna_rdb.py). A commit may have reached the server
just before the connection broke, so the repeat must first see whether the work is done:

- a new trial: every trial made through pgjob's storage records, in the same transaction,
  the request that made it (`pgjob_requests`); a repeated request finds its trial there
  and returns it, so no second trial is ever made (also for Optuna's own internal retry);
- a state or value already set by the lost attempt is not an error (no
  UpdateFinishedTrialError for a trial this worker itself finished);
- a trial claimed from WAITING whose claim was lost counts as claimed by this worker when
  it is RUNNING since the moment of the claim and no other worker has taken it;
- a study that the lost attempt created is the one returned.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import contextmanager

import psycopg

from .errors import first_line

log = logging.getLogger("pgjob.storage")

TABLE = """
create table if not exists pgjob_requests (
    request uuid primary key,
    trial_id integer not null,
    made timestamptz not null default now())
"""
KEEP = "1 day"  # how long a request is remembered (the server's sweep forgets older ones)

_request = threading.local()


def is_connection_loss(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) is a lost or refused connection, not a bad query."""
    import sqlalchemy.exc

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and not \
                isinstance(exc, psycopg.errors.QueryCanceled):
            return True
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "orig", None)
    return False


def _inner(exc: BaseException) -> BaseException:
    """The driver's error inside SQLAlchemy's and Optuna's wrappers: the one that says why."""
    return getattr(exc, "orig", None) or exc.__cause__ or exc


NOT_SETTLED = object()


def call(storage, name: str, attempt, settle=None):
    """(result, repeated): `attempt()`, repeated across lost connections for up to the
    storage's wait. After a lost attempt, an error of the repeat goes to `settle(exc)`,
    which returns the result if the lost attempt had already done the work, else
    NOT_SETTLED (and the error stands)."""
    deadline = time.monotonic() + storage.pgjob_wait
    pause, repeated = 0.5, False
    while True:
        try:
            return attempt(), repeated
        except Exception as exc:
            if repeated and settle is not None and not is_connection_loss(exc):
                settled = settle(exc)
                if settled is not NOT_SETTLED:
                    return settled, repeated
            if not is_connection_loss(exc) or time.monotonic() > deadline:
                raise
            log.warning("the server could not complete %s (%s); waiting for it to come "
                        "back (home %s)", name, first_line(_inner(exc)), storage.pgjob_home.path)
            storage.engine.dispose()  # every pooled connection went to the old server
            time.sleep(pause)
            pause = min(pause * 2, storage.pgjob_pause)
            repeated = True


@contextmanager
def new_trial_request():
    """Marks the trial creation made in this thread meanwhile with a request id."""
    _request.current = [uuid.uuid4(), False]  # id, whether an attempt has reached the server
    try:
        yield
    finally:
        _request.current = None


def made_once(session, make, find):
    """The trial of this thread's request: the one an earlier attempt made, if its commit
    reached the server, else `make()`, recorded with the request in the same transaction."""
    from sqlalchemy import text

    current = getattr(_request, "current", None)
    if current is None:
        return make()
    request, tried = current
    if tried:
        row = session.execute(text("select trial_id from pgjob_requests where request = :r"),
                              {"r": request}).first()
        if row is not None:
            found = find(row[0])
            if found is not None:
                log.info("the lost attempt had made trial %d; using it", row[0])
                return found
    current[1] = True
    trial = make()
    session.execute(text("insert into pgjob_requests (request, trial_id) values (:r, :t)"),
                    {"r": request, "t": trial.trial_id})
    return trial
