"""pgjob's journal backend (journal.py) from the outside: what Optuna's JournalStorage
relies on a backend for, on a real server shared by the module.

- every log comes back as Optuna's file backend gives it back (infinities, NaN, large
  floats, the order of a dict's keys);
- 8 processes appending and reading at once all see one dense, identical sequence, each
  process's own logs in its order, and every read a prefix of it; 10 processes taking
  enqueued trials never take the same one;
- an append whose reply was lost is repeated on a new connection and written once, one
  whose request was lost is written once too;
- a snapshot not signed with the home's key, or of another Optuna version, is never
  loaded (it is a pickle: loading runs code);
- wait_for_logs wakes on another process's append, gives up after its timeout, and
  listens again when its session is lost.

Optuna's own backend tests (its journal_tests) run on this backend in
test_optuna_conformance.py; docs/optuna-conformance.md says which.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import optuna
import pytest

import pgjob
from pgjob import endpoint, journal, signing
from pgjob.home import open_home

pytestmark = pytest.mark.pg


@pytest.fixture
def home(journal_server) -> Path:
    """The module's journal home, its journal empty (a JournalStorage replays from log 0,
    so the counter starts again at 0) and without snapshots."""
    with journal_server.endpoint().connect() as conn:
        journal.ensure_tables(conn)
        conn.execute("delete from pgjob_journal")
        conn.execute("delete from pgjob_journal_snapshots")
        conn.execute("update pgjob_journal_head set next = 0")
    return journal_server.home_path


@pytest.fixture
def backend():
    """New PgJournalBackends on a home, each with connections of its own, closed after
    the test."""
    made: list[journal.PgJournalBackend] = []
    yield lambda home: made.append(journal.PgJournalBackend(open_home(home), wait=30)) or made[-1]
    for each in made:
        each.close()


def sql(where: Path | endpoint.Endpoint, query: str, params=None) -> list[tuple]:
    """`query` as the application role, on a connection of its own (not the backend's),
    to the server of a home or at an endpoint."""
    found = where if isinstance(where, endpoint.Endpoint) else endpoint.read(open_home(where))
    with found.connect() as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


def as_written(logs) -> list[str]:
    """Logs as Optuna's file backend writes them: what must come back, exactly."""
    return [json.dumps(entry, separators=(",", ":")) for entry in logs]


# What Optuna writes (values, intermediate values, attributes) and a JSON column type
# would not give back: jsonb refuses NaN and the infinities, keeps 1e20 as the integer
# 100000000000000000000, reorders keys, refuses \u0000.
AWKWARD = [
    {"op_code": 6, "trial_id": 0, "state": 1, "values": [float("inf"), float("-inf")]},
    {"op_code": 7, "trial_id": 0, "step": 0, "intermediate_value": float("nan")},
    {"op_code": 8, "trial_id": 0, "user_attr": {
        "big": 1e20, "max": 1.7976931348623157e308, "tiny": 5e-324, "minus_zero": -0.0}},
    {"op_code": 8, "trial_id": 0, "user_attr": {"order": {"zz": 1, "a": 2, "mmm": 3}}},
    {"op_code": 2, "study_id": 0, "user_attr": {"text": "nul \x00, ünïcode 😀, lone \ud800"}},
]


def test_every_log_comes_back_as_optuna_s_file_backend_gives_it_back(home, backend):
    writer, reader = backend(home), backend(home)
    writer.append_logs(AWKWARD[:2])
    writer.append_logs(AWKWARD[2:])
    assert as_written(writer.read_logs(0)) == as_written(AWKWARD)  # part from the append's reply
    assert as_written(reader.read_logs(0)) == as_written(AWKWARD)  # a plain read


def test_another_worker_sees_the_infinite_nan_and_large_values_a_trial_reported(home):
    storage = pgjob.optuna_storage(home, wait=30)
    study = optuna.create_study(storage=storage, study_name="awkward")
    trial = study.ask()
    trial.report(float("nan"), 0)
    study.tell(trial, float("inf"))
    study.enqueue_trial({"x": 1e20})
    seen = optuna.load_study(study_name="awkward", storage=pgjob.optuna_storage(home)).trials
    assert seen[0].value == float("inf") and math.isnan(seen[0].intermediate_values[0])
    assert type(seen[1].system_attrs["fixed_params"]["x"]) is float


# -- 8 processes at once ------------------------------------------------------------------

STRESS = """
import json, sys
from pgjob.home import open_home
from pgjob.journal import PgJournalBackend

home, worker, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
backend = PgJournalBackend(open_home(home), wait=60)
seen = list(backend.read_logs(0))  # connected
print("ready", flush=True)
sys.stdin.readline()
sizes = [1, 1, 4, 1, 2, 7]  # appends of one log and of several
sent = appends = 0
while sent < n:
    size = min(sizes[appends % len(sizes)], n - sent)
    backend.append_logs([{"worker": worker, "seq": sent + k} for k in range(size)])
    sent, appends = sent + size, appends + 1
    seen += backend.read_logs(len(seen))  # as Optuna reads after its append: the reply
    if appends % 3 == 0:
        seen += backend.read_logs(len(seen))  # a plain read, as a worker between appends
print("appended", flush=True)
sys.stdin.readline()
whole = list(backend.read_logs(0))
print(json.dumps({"seen": [[e["worker"], e["seq"]] for e in seen],
                  "whole": [[e["worker"], e["seq"]] for e in whole]}), flush=True)
"""


def test_eight_processes_appending_and_reading_see_one_dense_sequence(home, tmp_path):
    workers, n = 8, 300
    script = tmp_path / "stress.py"
    script.write_text(STRESS)
    errors = tmp_path / "stress.err"
    with open(errors, "w") as err:
        processes = [subprocess.Popen([sys.executable, str(script), str(home), str(w), str(n)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=err, text=True) for w in range(workers)]
    try:
        for step in ("ready", "appended"):  # all start at once; all have ended to read
            for process in processes:
                line = process.stdout.readline().strip()
                assert line == step, f"a worker said {line!r}; its errors:\n{errors.read_text()}"
            for process in processes:
                process.stdin.write("go\n")
                process.stdin.flush()
        results = [json.loads(process.stdout.readline()) for process in processes]
        assert [process.wait(60) for process in processes] == [0] * workers, errors.read_text()
    finally:
        for process in processes:
            process.kill()
            process.communicate()  # and its pipes closed
    whole = results[0]["whole"]
    assert all(r["whole"] == whole for r in results)  # one sequence for everyone
    assert sorted(map(tuple, whole)) == [(w, s) for w in range(workers) for s in range(n)]
    for w in range(workers):  # each process's own logs in the order it appended them
        assert [s for (who, s) in whole if who == w] == list(range(n))
    for r in results:  # every read went on where the last ended: never a log skipped
        assert r["seen"] == whole[:len(r["seen"])]
        assert len(r["seen"]) >= n
    assert sql(home, "select count(*), min(id), max(id), (select next from pgjob_journal_head)"
                     " from pgjob_journal") == [(workers * n, 0, workers * n - 1, workers * n)]


def pop_a_waiting_trial(home: str, study_name: str) -> int | None:
    study = optuna.load_study(study_name=study_name, storage=pgjob.optuna_storage(home))
    return study._pop_waiting_trial_id()


def test_each_enqueued_trial_is_taken_by_one_of_ten_processes(home):
    """Optuna's test_pop_waiting_trial_multiprocess_safe, which opens a file journal
    itself: a waiting trial goes RUNNING by an append, and the first one in the journal's
    order wins, so two workers never take the same trial."""
    study = optuna.create_study(study_name="queue", storage=pgjob.optuna_storage(home))
    for i in range(10):
        study.enqueue_trial({"i": i})
    with ProcessPoolExecutor(10, mp_context=multiprocessing.get_context("fork")) as pool:
        taken = list(pool.map(pop_a_waiting_trial, [str(home)] * 10, ["queue"] * 10))
    assert len(taken) == 10
    assert set(taken) == {t._trial_id for t in study.get_trials()}  # each once, none missed


# -- a lost reply, a lost request -----------------------------------------------------------

class LossyRelay:
    """A TCP relay in front of the server that, when told, loses one message: the next
    reply (the server did the work and committed; the client sees its connection break)
    or the next request (the server never sees it). TLS passes through it untouched."""

    def __init__(self, server: endpoint.Endpoint, probe) -> None:
        self.server, self.probe = server, probe
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lose: str | None = None  # "reply" or "request"
        self.connections = 0
        self.at_loss = None  # what `probe` saw when the message was lost
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection((self.server.host, self.server.port))
            for source, sink, kind in ((client, upstream, "request"), (upstream, client, "reply")):
                threading.Thread(target=self._pump, args=(source, sink, kind, (client, upstream)),
                                 daemon=True).start()

    def _pump(self, source, sink, kind, both) -> None:
        try:
            while data := source.recv(65536):
                if self.lose == kind:
                    self.lose, self.at_loss = None, self.probe()
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in both:  # the other direction ends too
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        source.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("lost", ["reply", "request"])
def test_an_append_repeated_after_a_lost_message_is_written_once(home, backend, monkeypatch,
                                                                caplog, lost):
    found = endpoint.read(open_home(home))
    relay = LossyRelay(found, lambda: sql(found, "select count(*) from pgjob_journal")[0][0])
    monkeypatch.setattr(endpoint, "read", lambda _home: dataclasses.replace(found, port=relay.port))
    try:
        writer = backend(home)
        writer.append_logs([{"op_code": 0, "n": 0}])  # connected, through the relay
        relay.lose = lost
        with caplog.at_level(logging.WARNING, logger="pgjob.journal"):
            writer.append_logs([{"op_code": 0, "n": 1}, {"op_code": 0, "n": 2}])
    finally:
        relay.close()
    assert "could not complete an append to the journal" in caplog.text
    assert relay.connections == 2  # the repeat went over a new connection
    # a lost reply: the append had committed before the client knew; a lost request: not
    assert relay.at_loss == {"reply": 3, "request": 1}[lost]
    assert [e["n"] for e in writer.read_logs(0)] == [0, 1, 2]
    assert sql(found, "select count(*), (select next from pgjob_journal_head) "
                      "from pgjob_journal") == [(3, 3)]


# -- snapshots: pickles, so loaded only when signed with the home's key, for this Optuna ---

class Marker:
    """A pickle that, when loaded, makes a folder: what an attacker would store, with a
    worse command."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def plant_snapshot(home: Path, body: bytes, *, version: str = optuna.__version__,
                   signed_for: str | None = None, key: bytes | None = None) -> None:
    """A snapshot row written with only the database password, as anyone with it could;
    with `key`, signed as pgjob signs one for Optuna `signed_for` (default: `version`)."""
    upto = sql(home, "select next from pgjob_journal_head")[0][0]
    parts = ("pgjob journal snapshot", signed_for or version, upto, body)
    mac = signing.sign(key, *parts) if key else b"\0" * 32
    sql(home, "insert into pgjob_journal_snapshots (optuna, upto, body, mac) "
              "values (%s, %s, %s, %s) on conflict (optuna) do update "
              "set upto = excluded.upto, body = excluded.body, mac = excluded.mac",
        (version, upto, body, mac))


def a_study(home: Path) -> list[float]:
    study = optuna.create_study(study_name="snap", storage=pgjob.optuna_storage(home))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    return [t.value for t in study.trials]


def values_seen_by_a_new_worker(home: Path) -> list[float]:
    study = optuna.load_study(study_name="snap", storage=pgjob.optuna_storage(home, wait=30))
    return [t.value for t in study.trials]


def test_a_snapshot_not_signed_with_the_home_s_key_is_never_loaded(home, tmp_path, caplog):
    values = a_study(home)
    marker = tmp_path / "loaded"
    body = zlib.compress(pickle.dumps(Marker(marker)))
    plant_snapshot(home, body)  # no key: a mac of zeros
    with caplog.at_level(logging.WARNING, logger="pgjob.journal"):
        assert values_seen_by_a_new_worker(home) == values  # replayed from the logs
    assert not marker.exists()
    assert "not signed with this home's key" in caplog.text
    # signed with another key (another home's, an old one) it is not loaded either
    plant_snapshot(home, body, key=b"k" * signing.KEY_BYTES)
    assert values_seen_by_a_new_worker(home) == values
    assert not marker.exists()
    # the same pickle, signed with the home's key, is loaded: the check is what stopped it
    plant_snapshot(home, body, key=signing.key(open_home(home)))
    values_seen_by_a_new_worker(home)
    assert marker.exists()


def test_a_snapshot_of_another_optuna_version_is_not_loaded(home, tmp_path, caplog):
    values = a_study(home)
    marker = tmp_path / "loaded"
    body = zlib.compress(pickle.dumps(Marker(marker)))
    key = signing.key(open_home(home))
    plant_snapshot(home, body, version="3.6.1", key=key)  # signed, but of Optuna 3.6.1
    assert values_seen_by_a_new_worker(home) == values
    # nor one of 3.6.1 filed under this version's name: the signature names the version
    plant_snapshot(home, body, signed_for="3.6.1", key=key)
    with caplog.at_level(logging.WARNING, logger="pgjob.journal"):
        assert values_seen_by_a_new_worker(home) == values
    assert "not signed with this home's key" in caplog.text
    assert not marker.exists()


# -- waiting for another worker's logs ----------------------------------------------------

APPEND_LATER = """
import sys, time
from pgjob.home import open_home
from pgjob.journal import PgJournalBackend

backend = PgJournalBackend(open_home(sys.argv[1]), wait=60)
list(backend.read_logs(0))
print("ready", flush=True)
time.sleep(1.0)
backend.append_logs([{"op_code": 0, "late": True}])
print(time.time(), flush=True)
"""


def test_wait_for_logs_wakes_on_another_process_s_append_and_else_times_out(home, backend,
                                                                           tmp_path):
    waiter = backend(home)
    waiter.append_logs([{"op_code": 0}])
    assert waiter.wait_for_logs(0, timeout=30) is True  # there is one already
    started = time.monotonic()
    assert waiter.wait_for_logs(1, timeout=1.5) is False  # nobody appends
    assert 1.5 <= time.monotonic() - started < 5
    script = tmp_path / "append_later.py"
    script.write_text(APPEND_LATER)
    other = subprocess.Popen([sys.executable, str(script), str(home)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "ready"
        assert waiter.wait_for_logs(1, timeout=30) is True
        woke = time.time()
        appended = float(other.stdout.readline())
        assert other.wait(30) == 0
    finally:
        other.kill()
        other.communicate()
    assert woke - appended < 1.0  # on the NOTIFY, not at the timeout nor a poll's next turn


def test_wait_for_logs_listens_again_when_its_session_is_lost(home, backend):
    waiter, writer = backend(home), backend(home)
    writer.append_logs([{"op_code": 0}])

    def lose_the_listener_then_append():
        time.sleep(0.5)  # the waiter asleep on its LISTEN
        # as a server restart or a move does to it (a role may end its own sessions)
        ended = sql(home, "select pg_terminate_backend(pid) from pg_stat_activity "
                          "where query like 'listen%' and pid <> pg_backend_pid()")
        time.sleep(0.5)
        writer.append_logs([{"op_code": 0}])
        return ended

    done = []
    thread = threading.Thread(target=lambda: done.append(lose_the_listener_then_append()))
    thread.start()
    started = time.monotonic()
    try:
        assert waiter.wait_for_logs(1, timeout=30) is True
    finally:
        thread.join(30)
    assert done == [[(True,)]]  # the waiter's session was ended, and it still woke
    assert time.monotonic() - started < 10


BACKLOG = 30  # appends of 100 logs of 2 kB: past what the network's buffers hold


def test_a_worker_that_stops_reading_mid_append_holds_no_other_append_up(home, backend):
    """A worker stopped (SIGSTOP, a frozen node) while its append's reply is on the way
    must not keep the journal's counter locked: the reply is small enough for the
    network's buffers, so the server commits without waiting for the worker to read."""
    first = backend(home)
    blob = "x" * 2000  # a study far ahead of the stopped worker: 6 MB it has not read
    for _ in range(BACKLOG):
        first.append_logs([{"op_code": 9, "trial_id": 0, "system_attr": {"b": blob}}] * 100)
    found = endpoint.read(open_home(home))
    stopped = found.connect()
    texts = [json.dumps({"op_code": 9, "trial_id": 0})]
    # sent, never read: what a process stopped right after sending does
    stopped.pgconn.send_query_params(
        b"select * from pgjob_journal_append($1, $2, $3, $4, $5, $6, $7)",
        [f"{{{json.dumps(texts[0])}}}".encode(), b"{9}", b"{NULL}", b"{0}", b"{NULL}",
         str(__import__("uuid").uuid4()).encode(), b"0"])
    stopped.pgconn.flush()
    time.sleep(1)
    other = backend(home)
    done = threading.Event()
    threading.Thread(target=lambda: (other.append_logs([{"op_code": 9}]), done.set()),
                     daemon=True).start()
    try:
        assert done.wait(30), "an append waited for a worker that had stopped reading"
        assert sql(home, "select count(*) from pgjob_journal")[0][0] == BACKLOG * 100 + 2
        # its reply held only the first logs; the read after it brings all the rest
        logs = list(other.read_logs(0))
        assert len(logs) == BACKLOG * 100 + 2 and logs[-1] == {"op_code": 9}
    finally:
        stopped.close()
