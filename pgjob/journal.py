"""Optuna's journal kept in pgjob's PostgreSQL: the backend of a journal home's storage.

Optuna's JournalStorage keeps each study in the worker's memory and only appends logs of
operations; this module is where those logs live, as rows of `pgjob_journal`:

- each log exactly as Optuna's own backends keep it: the text of `json.dumps`, read back
  with `json.loads` (jsonb would refuse the infinities and NaN that Optuna logs for
  values, turn 1e20 into an integer and reorder a dict's keys);
- a total order with no gaps a reader could see: log numbers are handed out from a
  one-row counter (`pgjob_journal_head`) whose row lock is held until the append commits,
  so appends commit in log-number order and every reader sees a dense prefix;
- an append is one round trip (one function call) that also returns every log the
  worker has not read yet, which is exactly what Optuna reads next; a plain read fetches
  only the logs after the worker's position;
- each append carries a request id, so the repeat of an append whose reply was lost
  (the server restarted or moved) is recognised and never written twice;
- a NOTIFY on every append: `wait_for_logs` sleeps on it instead of polling;
- snapshots (Optuna's pickled in-memory state) so a worker joining a large study reads
  only the logs after it. A snapshot is pickle, which runs code when loaded, so each one
  is signed with a key that lives in the home's secrets, not in the database: a snapshot
  that anyone with only the database password wrote is never loaded.

The connection follows the home's endpoint: when the server restarts or moves, a call
waits (bounded, with backoff) for it to be published again and is repeated there.

Importing this module imports Optuna (its base classes); only journal homes' storage and
server-side care import it.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import zlib
from typing import Any, Callable, Iterator

import optuna
import psycopg
from optuna.storages.journal import BaseJournalBackend
from optuna.storages.journal._base import BaseJournalSnapshot

from . import endpoint, heartbeat, signing
from .errors import NotPublished, first_line
from .home import Home
from .waiting import until

log = logging.getLogger("pgjob.journal")

CHANNEL = "pgjob_journal"
PAGE = 20_000  # logs per read: a joining worker replays a large study in bounded pieces
REPLY_BYTES = 64 * 1024  # the most an append's reply holds (see pgjob_journal_append)

TABLES = (
    # Beside each log, the few fields of it that `pgjob status` counts by, typed (the log
    # itself may hold NaN or Infinity, which PostgreSQL's JSON types refuse).
    """create table if not exists pgjob_journal (
        id bigint primary key,
        log text not null,
        request uuid not null,
        op smallint,
        study integer,
        trial integer,
        state smallint)""",
    """create table if not exists pgjob_journal_head (
        one boolean primary key default true check (one),
        next bigint not null)""",
    "insert into pgjob_journal_head (one, next) values (true, 0) on conflict do nothing",
    """create table if not exists pgjob_journal_snapshots (
        optuna text primary key,
        upto bigint not null,
        body bytea not null,
        mac bytea not null,
        saved timestamptz not null default now())""",
    # One call, one round trip. The counter row is locked first, so that a repeat finds
    # a lost attempt that committed, and waits for one that is still committing (and an
    # attempt that arrives late, after its own repeat, finds the repeat). Every statement
    # in a plpgsql function takes a new snapshot: the final select sees all that
    # committed before this append (the row lock's order) and this append itself.
    # The reply (the logs from `known` on, with `upto`: the id of this append's last log)
    # is sent before the commit, while the counter is still locked: it is kept under
    # REPLY_BYTES (at least one log), which the network's buffers take whole, so that a
    # worker that stops reading (SIGSTOP, a frozen node) never holds every other append
    # up. It reads the rest afterwards, outside the lock.
    f"""create or replace function pgjob_journal_append(
        logs text[], ops smallint[], studies integer[], trials integer[], states smallint[],
        request uuid, known bigint)
    returns table (id bigint, log text, upto bigint)
    language plpgsql set search_path = pg_catalog, public as $$
    declare
        first bigint;
        last bigint;
        n integer := cardinality(logs);
    begin
        select h.next into first from pgjob_journal_head h for update;
        select max(j.id) into last from pgjob_journal j
            where j.id >= known and j.request = pgjob_journal_append.request;
        if last is null then
            last := first + n - 1;
            update pgjob_journal_head set next = next + n;
            insert into pgjob_journal (id, log, request, op, study, trial, state)
                select first + o - 1, l, pgjob_journal_append.request, u.op, u.study,
                       u.trial, u.state
                from unnest(logs, ops, studies, trials, states)
                    with ordinality as u(l, op, study, trial, state, o);
            perform pg_notify('pgjob_journal', (first + n)::text);
        end if;
        return query
            select r.id, r.log, last from (
                select j.id, j.log, sum(octet_length(j.log)) over (order by j.id) as bytes
                from pgjob_journal j where j.id >= known order by j.id limit 1000) as r
            where r.bytes <= {REPLY_BYTES} or r.id = known order by r.id;
    end $$""",
)

APPEND_SIGNATURE = ("pgjob_journal_append(text[], smallint[], integer[], integer[], "
                    "smallint[], uuid, bigint)")
_APPEND = "select id, log, upto from pgjob_journal_append(%s, %s, %s, %s, %s, %s, %s)"
_READ = "select id, log from pgjob_journal where id >= %s order by id limit %s"
_SAVE = """
insert into pgjob_journal_snapshots as s (optuna, upto, body, mac)
values (%(optuna)s, %(upto)s, %(body)s, %(mac)s)
on conflict (optuna) do update
    set upto = excluded.upto, body = excluded.body, mac = excluded.mac, saved = now()
    where s.upto < excluded.upto
"""
# A snapshot past the journal's end (the journal was restored from an older backup
# than the snapshot, say) describes logs that are not there: not used.
_LOAD = """
select s.upto, s.body, s.mac from pgjob_journal_snapshots s, pgjob_journal_head h
where s.optuna = %s and s.upto <= h.next
"""

# Snapshots are saved when Optuna offers one (every 100th trial) only once this many
# logs, or a quarter of the journal, have been appended since the last one: a saved
# snapshot of a large study is many megabytes, uploaded by one worker while others wait.
SNAPSHOT_MIN_LOGS = 2_000


def ensure_tables(conn: psycopg.Connection) -> None:
    """The journal's tables and function, and pgjob's heartbeat table, made once by
    whichever worker comes first (under the advisory lock that rdb homes' tables are made
    under, see schema.py)."""
    from .schema import LOCK_KEY

    present = conn.execute(
        "select to_regclass('public.pgjob_journal_snapshots') is not null and "
        "to_regprocedure(%s) is not null", (APPEND_SIGNATURE,)).fetchone()[0]
    if present:
        return
    with conn.transaction():
        conn.execute("select pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        for ddl in (*TABLES, heartbeat.TABLE):
            conn.execute(ddl)


# The log fields in the columns op, study, trial, state, with the largest value each holds.
COUNTED = {"op_code": 2**15 - 1, "study_id": 2**31 - 1, "trial_id": 2**31 - 1,
           "state": 2**15 - 1}


def counted_fields(entry: dict[str, Any]) -> tuple:
    """The COUNTED fields of a log where they are whole numbers that fit their columns,
    else None: nothing in a log can make its append fail."""
    return tuple(int(value) if isinstance(value, int) and not isinstance(value, bool)
                 and 0 <= value <= most else None
                 for value, most in ((entry.get(name), most) for name, most in COUNTED.items()))


def _is_connection_loss(exc: BaseException) -> bool:
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and not \
        isinstance(exc, psycopg.errors.QueryCanceled)


def connect_published(home: Home, through: Callable[[endpoint.Endpoint],
                      psycopg.Connection] | None = None) -> psycopg.Connection | None:
    """One try at a connection to the server published for `home` (`through(found)`
    connects by another way, a tunnel's local end); None while none answers."""
    found = endpoint.read(home)
    if found is None:
        return None
    try:
        conn = through(found) if through else found.connect(timeout=10)
    except psycopg.OperationalError:
        return None
    if found.pooler:  # pgbouncer's transaction pooling keeps no prepared statement
        conn.prepare_threshold = None
    return conn


class PgJournalBackend(BaseJournalBackend, BaseJournalSnapshot):
    """Optuna's BaseJournalBackend and BaseJournalSnapshot on a pgjob server.

    One connection, used under a lock: Optuna calls it under its own storage lock, pgjob's
    heartbeat thread between those calls. Snapshots are kept per Optuna version (a pickle
    of one version is no state of another).
    """

    def __init__(self, home: Home, *, wait: float = 600.0, pause: float = 5.0,
                 dial: Callable[[], psycopg.Connection | None] | None = None,
                 prepare: bool = True) -> None:
        self.home = home
        self.wait = wait
        self.pause = pause
        # One try at a connection, None while no server answers: by default the server
        # published for the home (a tunnel's dashboard and the server's own sweep bring
        # theirs). With `prepare`, each new connection checks the database's kind and
        # makes the journal's tables, as a worker must; the server's sweep makes none.
        self._dial = dial
        self.prepare = prepare
        self.optuna_version = optuna.__version__
        self._lock = threading.RLock()
        self._conn: psycopg.Connection | None = None
        self._pid = os.getpid()
        self._position = 0  # how many logs this backend has handed out (Optuna's next read)
        self._fetched: tuple[int, list, bool] | None = None  # an append's reply, for the next read
        self._snapshot_upto = 0
        self._key = signing.key(home)
        self._warned_key = False
        self._listener: psycopg.Connection | None = None
        self._listening = False

    # -- the connection ---------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_lock", "_conn", "_listener", "_fetched"):
            state.pop(name)
        state["_dial"] = None  # an unpickled copy finds the server from the home
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._conn = self._listener = self._fetched = None
        self._pid = os.getpid()
        self._position = 0  # an unpickled JournalStorage replays from the start

    def forked(self) -> None:
        """In a child after fork: the parent's connections are not ours. psycopg never
        closes a connection in a process other than the one that opened it, so dropping
        them leaves the parent's sessions alone."""
        self._lock = threading.RLock()
        self._conn = self._listener = self._fetched = None
        self._pid = os.getpid()

    def _connect(self) -> psycopg.Connection:
        attempt = self._dial or (lambda: connect_published(self.home))
        conn = until(attempt, self.wait, interval=0.2, max_interval=self.pause)
        if conn is None:
            raise NotPublished(f"no server answered for {self.home.path} within "
                               f"{self.wait:.0f} s; check `pgjob status`")
        if self.prepare:
            from .schema import check_kind

            check_kind(lambda query: conn.execute(query).fetchone(), self.home)
            ensure_tables(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in (self._conn, self._listener):
                if conn is not None and self._pid == os.getpid():
                    conn.close()
            self._conn = self._listener = None

    def run(self, what: str, work):
        """`work(conn)` on the live connection; after a lost connection, again on a new one
        once the server is back, for up to `wait` (an append is safe to repeat: see
        pgjob_journal_append)."""
        deadline = time.monotonic() + self.wait
        pause = 0.5
        with self._lock:
            while True:
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = self._connect()
                    return work(self._conn)
                except Exception as exc:
                    if not _is_connection_loss(exc) or time.monotonic() > deadline:
                        raise
                    log.warning("the server could not complete %s (%s); waiting for it to "
                                "come back (home %s)", what, first_line(exc), self.home.path)
                    self._drop()
                    time.sleep(pause)
                    pause = min(pause * 2, self.pause)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    # -- Optuna's BaseJournalBackend ------------------------------------------------

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        request = uuid.uuid4()
        known = self._position
        texts = [json.dumps(entry, separators=(",", ":")) for entry in logs]  # as Optuna's file
        columns = [list(column) for column in zip(*map(counted_fields, logs))]
        params = (texts, *columns, request, known)
        rows = self.run("an append to the journal",
                        lambda conn: conn.execute(_APPEND, params).fetchall())
        # (where it starts, its logs, whether they reach this append's last log)
        self._fetched = (known, [row[:2] for row in rows], rows[-1][0] >= rows[-1][2])

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        # Optuna says how far it has read: after a snapshot it may be far past what this
        # backend handed out, and the next append asks for the logs after this position.
        self._position = log_number_from
        fetched, self._fetched = self._fetched, None
        if fetched is not None and fetched[0] == log_number_from:
            rows, whole = fetched[1], fetched[2]  # the append's reply: no second round trip
            yield from self._hand_out(rows, log_number_from)
            if whole:
                return
            log_number_from += len(rows)
        while True:
            start = log_number_from
            rows = self.run("a read of the journal",
                            lambda conn: conn.execute(_READ, (start, PAGE)).fetchall())
            yield from self._hand_out(rows, start)
            if len(rows) < PAGE:
                return
            log_number_from += len(rows)

    def _hand_out(self, rows: list, start: int) -> Iterator[dict[str, Any]]:
        for number, (log_id, body) in enumerate(rows, start):
            if log_id != number:  # cannot happen with the counter; never replay a hole
                raise RuntimeError(f"the journal has no log {number} (next is {log_id}): "
                                   "its table was edited by hand; restore it from a backup")
            self._position = number + 1
            yield json.loads(body)

    # -- Optuna's BaseJournalSnapshot -----------------------------------------------

    def snapshot_due(self) -> bool:
        """Whether a snapshot offered now would be saved: enough logs since the last one
        this worker saw, and a key to sign it with. (Optuna pickles its whole state before
        it offers one, a second at 100k trials, so PgJobJournalStorage asks first.)"""
        return self._key is not None and self._position - self._snapshot_upto >= max(
            SNAPSHOT_MIN_LOGS, self._snapshot_upto // 4)

    def save_snapshot(self, snapshot: bytes) -> None:
        upto = self._position
        if self._key is None:
            self._warn_no_key()
            return
        if not self.snapshot_due():
            return
        # Optuna's pickle of a study shrinks about 5x (20 MB at 100k trials), in 80 ms.
        body = zlib.compress(snapshot, 1)
        params = {"optuna": self.optuna_version, "upto": upto, "body": body,
                  "mac": self._mac(upto, body)}
        self.run("saving a snapshot of the journal",
                 lambda conn: conn.execute(_SAVE, params))
        self._snapshot_upto = upto

    def load_snapshot(self) -> bytes | None:
        if self._key is None:
            self._warn_no_key()
            return None
        row = self.run("loading a snapshot of the journal",
                       lambda conn: conn.execute(_LOAD, (self.optuna_version,)).fetchone())
        if row is None:
            return None
        upto, body, mac = row[0], bytes(row[1]), bytes(row[2])
        if not signing.verify(self._key, mac, *self._signed(upto, body)):
            log.warning("the journal's snapshot in the database is not signed with this "
                        "home's key (%s), so it is not loaded: reading the whole journal "
                        "instead. Someone with the database password wrote it, or the key "
                        "was replaced; the next snapshot a worker saves replaces it",
                        self.home.journal_key)
            return None
        self._snapshot_upto = upto
        try:
            snapshot = zlib.decompress(body)
        except zlib.error:
            log.warning("the journal's snapshot in the database is damaged; reading the "
                        "whole journal instead")
            return None
        self._position = upto  # where the replay restored from it has read to
        return snapshot

    def _signed(self, upto: int, body: bytes) -> tuple:
        return ("pgjob journal snapshot", self.optuna_version, upto, body)

    def _mac(self, upto: int, body: bytes) -> bytes:
        return signing.sign(self._key, *self._signed(upto, body))

    def _warn_no_key(self) -> None:
        if not self._warned_key:
            self._warned_key = True
            log.warning("%s is missing or unreadable, so this worker neither saves nor loads "
                        "snapshots of the journal (a worker joining a large study then reads "
                        "all of it); run `pgjob init --home %s` to make it",
                        self.home.journal_key, self.home.path)

    # -- waiting for other workers' logs -------------------------------------------

    def wait_for_logs(self, after: int, timeout: float) -> bool:
        """Whether the journal holds more than `after` logs, waiting up to `timeout`
        seconds for another worker's append: asleep on a NOTIFY, not polling. (Behind
        pgbouncer's transaction pooling no session can LISTEN: there it looks once a
        second instead.) When the server restarts or moves meanwhile, it listens again
        there, and looks again."""
        deadline = time.monotonic() + timeout
        while True:
            listener, listening = self._listen()
            # listening first, then looking: an append in between is not missed
            head = self.run("a look at the journal's length", lambda conn: conn.execute(
                "select next from pgjob_journal_head").fetchone()[0])
            if head > after:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if not listening:
                time.sleep(min(left, 1.0))
                continue
            try:
                for notice in listener.notifies(timeout=left, stop_after=1):
                    if notice.payload.isdigit() and int(notice.payload) > after:
                        return True
            except Exception as exc:
                if not _is_connection_loss(exc):
                    raise
                with self._lock:  # a new session listens on the next turn
                    if self._listener is listener:
                        self._listener = None
                listener.close()

    def _listen(self) -> tuple[psycopg.Connection, bool]:
        with self._lock:
            if self._listener is None or self._listener.closed:
                self._listener, self._listening = self._connect(), False
                if not self._pooled():
                    self._listener.execute(f"listen {CHANNEL}")
                    self._listening = True
            return self._listener, self._listening

    def _pooled(self) -> bool:
        found = endpoint.read(self.home)
        return bool(found and found.pooler)
