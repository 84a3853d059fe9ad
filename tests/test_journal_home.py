"""A journal home (storage = "journal") served for real: the server's sweep fails a dead
worker's trial by appending its log and queues a retry, leaves a live worker's trial alone
across a restart, `pgjob status` counts the journal's trials, `pgjob dashboard` shows them.

One served home for the module, with 1 s heartbeats and a 3 s grace period; each test uses
studies of its own names.
"""
from __future__ import annotations

import collections
import json
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace

import optuna
import pytest
from optuna.trial import TrialState

import pgjob
from conftest import FAST, Served, pgjob_cmd, run_pgjob, set_settings
from dropin import WORKER_SCRIPT
from pgjob import dashboard, journal
from pgjob.home import open_home
from pgjob.journal import PgJournalBackend
from pgjob.tunnel import free_port
from pgjob.waiting import until

pytestmark = pytest.mark.pg

optuna.logging.set_verbosity(optuna.logging.WARNING)

class JournalHome:
    """The module's served journal home, and a storage of the test's own to look with."""

    def __init__(self, path, log) -> None:
        self.path, self.log = path, log
        self.home = open_home(path)
        self.served: Served | None = None
        self._storage = None

    def start(self) -> None:
        self.served = Served(self.path, self.log)
        Served.started.remove(self.served)  # it outlives each test: stopped by the fixture
        self.served.endpoint()

    def stop(self) -> None:
        if self.served is not None and self.served.process.poll() is None:
            assert self.served.stop() == 0, self.log.read_text()

    @property
    def storage(self):
        if self._storage is None:
            self._storage = pgjob.optuna_storage(self.path, wait=60)
        return self._storage

    def trials(self, name: str) -> list[optuna.trial.FrozenTrial]:
        try:
            return optuna.load_study(study_name=name, storage=self.storage).trials
        except KeyError:  # no worker has made it yet
            return []

    def states(self, name: str) -> dict[str, int]:
        return dict(collections.Counter(t.state.name for t in self.trials(name)))

    def beats(self) -> set[int]:
        """The trials with a pgjob heartbeat row."""
        with self.served.endpoint().connect() as conn:
            return {i for (i,) in conn.execute("select trial_id from pgjob_heartbeats")}


@pytest.fixture(scope="module")
def journal_home(template_home, tmp_path_factory):
    base = tmp_path_factory.mktemp("journal")
    path = base / "home"
    shutil.copytree(template_home, path, symlinks=True)
    set_settings(path, storage="journal", **FAST)
    home = JournalHome(path, base / "serve.log")
    home.start()
    try:
        yield home
    finally:
        home.stop()


def start_worker(home: JournalHome, tmp_path, study: str, trials: int, pause: float):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    log = tmp_path / f"worker-{study}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(script), str(home.path), study,
                                    str(trials), str(pause)], stdout=out,
                                   stderr=subprocess.STDOUT)
    return process, log


def test_a_killed_worker_s_trial_is_failed_by_the_server_and_retried(journal_home, tmp_path):
    worker, log = start_worker(journal_home, tmp_path, "killed", 1, 600)
    try:
        assert until(lambda: journal_home.states("killed") == {"RUNNING": 1}, 60), \
            log.read_text()
        # killed once its trial has its point (the worker suggests it just after starting)
        assert until(lambda: journal_home.trials("killed")[0].params, 10), log.read_text()
        trial, = journal_home.trials("killed")
        assert until(lambda: trial._trial_id in journal_home.beats(), 10)
    finally:
        worker.kill()
        worker.wait(10)
    # no other worker runs this study: the server's own sweep fails it, by a log
    assert until(lambda: journal_home.states("killed") == {"FAIL": 1, "WAITING": 1}, 30), \
        journal_home.states("killed")
    retry = [t for t in journal_home.trials("killed") if t.state.name == "WAITING"][0]
    assert retry.system_attrs["failed_trial"] == trial.number
    assert retry.params == trial.params  # the same point is tried again
    assert f"failed trial {trial._trial_id}: no heartbeat for" in journal_home.log.read_text()
    # the finished trial's heartbeat row is tidied away by a later sweep
    assert until(lambda: trial._trial_id not in journal_home.beats(), 10)
    # and no sweep failed, before the first worker made the journal's tables or after
    assert "sweep failed" not in journal_home.log.read_text(), journal_home.log.read_text()


def test_a_live_worker_s_trial_is_kept_by_the_sweeps_and_across_a_restart(journal_home,
                                                                          tmp_path):
    worker, log = start_worker(journal_home, tmp_path, "alive", 1, 14)
    try:
        assert until(lambda: journal_home.states("alive") == {"RUNNING": 1}, 60), \
            log.read_text()
        trial, = journal_home.trials("alive")
        time.sleep(4)  # longer than the grace period: sweeps came, its heartbeat kept it
        assert journal_home.states("alive") == {"RUNNING": 1}
        journal_home.stop()
        time.sleep(4)  # no server to send heartbeats to, for longer than the grace period
        journal_home.start()  # refreshes the heartbeats before it publishes and sweeps
        assert worker.wait(60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
    assert journal_home.states("alive") == {"COMPLETE": 1}
    served = journal_home.log.read_text()
    assert "running trials a fresh heartbeat after the restart" in served
    assert "sweep failed" not in served and f"failed trial {trial._trial_id}:" not in served


def test_status_counts_the_journal_s_trials_by_state_as_optuna_does(journal_home):
    storage = journal_home.storage
    study = optuna.create_study(storage=storage, study_name="counted")
    optuna.create_study(storage=storage, study_name="counted", load_if_exists=True)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    # values and reports the logs hold as NaN and Infinity, which no JSON type in
    # PostgreSQL takes: status counts them all the same
    inf = study.ask()
    inf.report(float("nan"), 0)
    study.tell(inf, float("inf"))

    def pruned(trial):
        raise optuna.TrialPruned()

    def failing(trial):
        raise ValueError("on purpose")

    study.optimize(pruned, n_trials=1)
    study.optimize(failing, n_trials=1, catch=(ValueError,))
    study.enqueue_trial({"x": 0.25})
    running = study.ask()  # takes the enqueued trial: WAITING, then RUNNING
    study.enqueue_trial({"x": 0.5})
    # a fail that comes after the trial completed (the server's sweep, say) changes nothing
    late = optuna.storages.JournalStorage(PgJournalBackend(journal_home.home, wait=10))
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        late.set_trial_state_values(study.trials[0]._trial_id, TrialState.FAIL)
    late._backend.close()
    gone = optuna.create_study(storage=storage, study_name="renewed")
    gone.optimize(lambda t: 1.0, n_trials=2)
    optuna.delete_study(study_name="renewed", storage=storage)
    optuna.create_study(storage=storage, study_name="renewed").optimize(lambda t: 1.0,
                                                                        n_trials=1)
    try:
        done = run_pgjob("status", "--home", str(journal_home.path), "--json")
        text = run_pgjob("status", "--home", str(journal_home.path))
        mistaken = run_pgjob("status", "--home", str(journal_home.path), "--json",
                             env={"PGJOB_STORAGE": "rdb"})
    finally:
        study.tell(running, 0.25)
    facts = json.loads(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert facts["storage"] == "journal" and "optuna_schema" not in facts
    assert facts["studies"]["counted"] == {"COMPLETE": 3, "PRUNED": 1, "FAIL": 1,
                                           "WAITING": 1, "RUNNING": 1}
    assert facts["studies"]["renewed"] == {"COMPLETE": 1}
    assert facts["journal"]["logs"] > 20
    assert "study counted: 3 complete, 1 fail, 1 pruned, 1 running, 1 waiting" in text.stdout
    assert f"storage:     journal, {facts['journal']['logs']} logs" in text.stdout
    assert "no Optuna tables" not in text.stdout
    # a setting that disagrees with the database shows the journal's studies all the same
    wrong = json.loads(mistaken.stdout)
    assert mistaken.returncode == 1 and wrong["storage"] == "journal"
    assert wrong["studies"]["counted"] == facts["studies"]["counted"]
    assert "the home is set to storage = 'rdb'" in wrong["problems"][0]
    # and every other study agrees with Optuna's own replay of the same journal
    for name, counts in facts["studies"].items():
        if name not in ("counted", "killed", "alive"):  # those may change meanwhile
            assert counts == journal_home.states(name), name


def test_the_dashboard_serves_the_journal_s_studies(journal_home, tmp_path):
    optuna.create_study(storage=journal_home.storage, study_name="on-the-board").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    port = free_port()
    with open(tmp_path / "dashboard.log", "w") as log:
        board = subprocess.Popen(pgjob_cmd("dashboard", "--home", str(journal_home.path),
                                           "--port", str(port)), stdout=log, stderr=log)
    try:
        def get(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",
                                            timeout=5) as answer:
                    return json.load(answer)
            except OSError:
                return None

        listed = until(lambda: get("/api/studies"), 60, interval=0.3)
        assert listed, (tmp_path / "dashboard.log").read_text()
        ids = {s["study_name"]: s["study_id"] for s in listed["study_summaries"]}
        detail = get(f"/api/studies/{ids['on-the-board']}")
        assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete"]
    finally:
        board.send_signal(signal.SIGTERM)
        assert board.wait(30) == 0, (tmp_path / "dashboard.log").read_text()


class Relay:
    """A TCP forward from a local port to the server, standing in for ssh's: it counts
    the connections that came through it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.count = target, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return
            self.count += 1
            far = socket.create_connection(self.target)
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def test_through_a_tunnel_the_dashboard_reads_the_journal_at_the_tunnel_s_end(journal_home):
    optuna.create_study(storage=journal_home.storage, study_name="through-the-tunnel")
    found = journal_home.served.endpoint()
    relay = Relay((found.host, found.port))

    class Tunnel:  # what dashboard.tunnel_journal asks of pgjob.tunnel.Tunnel
        def local_endpoint(self, published):
            return replace(published, host="127.0.0.1", port=relay.port)

    storage = dashboard.tunnel_journal(Tunnel(), journal_home.home, wait=10)
    try:
        names = {s.study_name for s in storage.get_all_studies()}
        assert "through-the-tunnel" in names and relay.count == 1
    finally:
        storage._backend.close()
        relay.listener.close()


def test_an_append_after_a_snapshot_gets_only_the_logs_after_it(journal_home, monkeypatch):
    """A replay restored from a snapshot has read up to it: the storage's next append must
    fetch only what follows, not the whole journal again."""
    monkeypatch.setattr(journal, "SNAPSHOT_MIN_LOGS", 0)
    writer = optuna.storages.JournalStorage(PgJournalBackend(journal_home.home, wait=10))
    study_id = writer.create_new_study([optuna.study.StudyDirection.MINIMIZE], "snapped")
    writer._backend._snapshot_upto = 0  # however recent the last snapshot, save this one
    writer._backend.save_snapshot(pickle.dumps(writer._replay_result))
    writer._backend.close()

    backend = PgJournalBackend(journal_home.home, wait=10)
    joined = optuna.storages.JournalStorage(backend)
    assert backend._snapshot_upto > 0  # it did start from the snapshot
    replies = []
    append = backend.append_logs

    def counted(logs):
        append(logs)
        replies.append(len(backend._fetched[1]))
    backend.append_logs = counted
    joined.set_study_user_attr(study_id, "seen", True)
    assert replies == [1]
    assert joined.get_study_user_attrs(study_id) == {"seen": True}
    backend.close()
