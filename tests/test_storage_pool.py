"""A worker process holds at most two server connections while its trials run (even with
n_jobs threads), one when idle, and does not reconnect for every trial."""
import threading
import time

import optuna
import pytest
import sqlalchemy

import pgjob
from pgjob.pool import SPARE_IDLE

pytestmark = pytest.mark.pg


def _backends(conn, name: str) -> int:
    return conn.execute("select count(*) from pg_stat_activity where application_name = %s "
                        "and pid <> pg_backend_pid()",
                        (name,)).fetchone()[0]


def test_threads_share_two_connections_and_one_stays(server, monkeypatch):
    monkeypatch.setenv("PGAPPNAME", "pool-test")
    found = server.endpoint()
    storage = pgjob.optuna_storage(server.home.path)
    connects = []
    sqlalchemy.event.listen(storage.engine, "connect", lambda *_: connects.append(1))
    study = optuna.create_study(storage=storage, study_name="pool",
                                sampler=optuna.samplers.RandomSampler())
    peak, done = [0], threading.Event()
    with found.connect() as conn:
        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], _backends(conn, "pool-test"))
                time.sleep(0.005)
        watcher = threading.Thread(target=watch)
        watcher.start()
        study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=120, n_jobs=4)
        done.set()
        watcher.join()
        assert len(study.trials) == 120
        assert peak[0] == 2  # two threads at once did get two, never more
        assert len(connects) <= 2, "connections were opened and closed per trial"
        time.sleep(SPARE_IDLE * 1.5 + 0.5)
        assert _backends(conn, "pool-test") == 1
