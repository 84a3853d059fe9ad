"""pgjob's Optuna storage inside the worker's process (issue 12): it pickles and survives a
fork as Optuna's RDBStorage does, its heartbeat thread outlives no storage and stops for no
deleted study, and a heartbeat that cannot be written is said once. Real `pgjob serve`,
real PostgreSQL, real Optuna, real processes."""
import gc
import logging
import multiprocessing
import os
import pickle
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import optuna
import psutil
import pytest

import pgjob
from dropin import beat, states, trial_ids
from pgjob.waiting import until

pytestmark = pytest.mark.pg


def quadratic(trial):
    return trial.suggest_float("x", -1, 1) ** 2


def optimize_three(study):
    """Run in a pool's child, on a study that came there pickled."""
    study.optimize(quadratic, n_trials=3)
    return os.getpid()


def pgjob_warnings(records):
    return [r.getMessage() for r in records
            if r.name.startswith("pgjob") and r.levelno >= logging.WARNING]


def test_the_storage_is_an_rdbstorage_of_a_module_level_class(fast_server):
    from pgjob.optuna_rdb import PgJobStorage

    storage = pgjob.optuna_storage(fast_server.home_path)
    assert type(storage) is PgJobStorage
    assert isinstance(storage, optuna.storages.RDBStorage)


def test_the_storage_and_a_study_on_it_pickle_and_work_again(fast_server):
    found = fast_server.endpoint()
    storage = pgjob.optuna_storage(fast_server.home_path)
    study = optuna.create_study(study_name="pickled", storage=storage)
    study.optimize(quadratic, n_trials=1)
    again = pickle.loads(pickle.dumps(storage))
    assert type(again) is type(storage)
    assert "pickled" in [s.study_name for s in again.get_all_studies()]
    optuna.load_study(study_name="pickled", storage=again).optimize(quadratic, n_trials=1)
    pickle.loads(pickle.dumps(study)).optimize(quadratic, n_trials=1)
    assert states(found, "pickled") == {"COMPLETE": 3}


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_study_sent_to_a_process_pool_runs_its_trials_there(fast_server, method):
    found, name = fast_server.endpoint(), f"pool-{method}"
    study = optuna.create_study(study_name=name,
                                storage=pgjob.optuna_storage(fast_server.home_path))
    study.optimize(quadratic, n_trials=1)  # the parent has used it before the pool starts
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method)) as pool:
        pids = list(pool.map(optimize_three, [study, study], timeout=120))
    assert os.getpid() not in pids
    assert states(found, name) == {"COMPLETE": 1 + 2 * 3}
    study.optimize(quadratic, n_trials=1)  # and the parent's storage still works
    assert states(found, name) == {"COMPLETE": 8}


def reaped(pid: int):
    """(wait status,) once the child `pid` has ended, else None."""
    done, status = os.waitpid(pid, os.WNOHANG)
    return (status,) if done == pid else None


def test_a_forked_child_uses_connections_of_its_own(fast_server, caplog):
    """Parent and child run trials at the same time on the storage the parent made before
    the fork: neither may talk on the other's connection (no error, no retry said), and the
    child's end must not break the parent's."""
    found = fast_server.endpoint()
    study = optuna.create_study(study_name="forked",
                                storage=pgjob.optuna_storage(fast_server.home_path))
    study.optimize(quadratic, n_trials=2)
    child = os.fork()
    if child == 0:
        code = 1
        try:
            study.optimize(quadratic, n_trials=5)
            said = pgjob_warnings(caplog.records)  # the child's own copy of the records
            print("\n".join(said), flush=True)
            code = 2 if said else 0
        finally:
            os._exit(code)
    try:
        study.optimize(quadratic, n_trials=5)
    finally:
        status = until(lambda: reaped(child), 60)
        if status is None:
            os.kill(child, 9)
            os.waitpid(child, 0)
    assert status is not None, "the forked child hung"
    assert os.waitstatus_to_exitcode(status[0]) == 0, "the forked child's trials failed"
    study.optimize(quadratic, n_trials=2)
    assert states(found, "forked") == {"COMPLETE": 2 + 5 + 5 + 2}
    assert pgjob_warnings(caplog.records) == []


def test_deleting_a_study_keeps_the_heartbeats_of_the_process_s_other_trials(fast_server,
                                                                              caplog):
    found = fast_server.endpoint()
    storage = pgjob.optuna_storage(fast_server.home_path)
    deleted = optuna.create_study(study_name="deleted", storage=storage)
    kept = optuna.create_study(study_name="kept", storage=storage)
    deleted.ask()  # a trial of this process, gone with its study
    running = kept.ask()
    [deleted_id], [kept_id] = trial_ids(found, "deleted"), trial_ids(found, "kept")
    assert until(lambda: beat(found, deleted_id) and beat(found, kept_id), 30)
    optuna.delete_study(study_name="deleted", storage=storage)
    for _ in range(2):  # it goes on beating, not just once more
        after = beat(found, kept_id)
        assert until(lambda: (beat(found, kept_id) or after) > after, 30), \
            "the kept study's running trial got no heartbeat after the delete"
    assert pgjob_warnings(caplog.records) == []
    kept.tell(running, 1.0)


def heartbeat_threads():
    return {t for t in threading.enumerate() if t.name == "pgjob-heartbeat"}


def server_ports(server_port: int) -> set[int]:
    """This process's local ports of its TCP connections to the server."""
    return {c.laddr.port for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == server_port}


def backends_on(found, ports) -> int:
    with found.connect() as conn:
        return conn.execute("select count(*) from pg_stat_activity where client_port = any(%s) "
                            "and pid <> pg_backend_pid()", (list(ports),)).fetchone()[0]


def test_a_dropped_storage_ends_its_thread_and_its_connections(fast_server):
    found = fast_server.endpoint()
    threads_before, ports_before = heartbeat_threads(), server_ports(found.port)
    storage = pgjob.optuna_storage(fast_server.home_path)
    optuna.create_study(study_name="dropped", storage=storage).ask()  # left RUNNING
    [trial_id] = trial_ids(found, "dropped")
    assert until(lambda: beat(found, trial_id), 30)
    [thread] = heartbeat_threads() - threads_before
    ours = server_ports(found.port) - ports_before
    assert backends_on(found, ours) >= 1  # the storage's connection, as the server sees it
    del storage  # the study and trial above were never kept
    gc.collect()
    assert until(lambda: not thread.is_alive(), 30), "the heartbeat thread outlived its storage"
    # nor does any other: the storages of the tests before are unreachable too by now
    assert until(lambda: not heartbeat_threads(), 30), heartbeat_threads()
    assert until(lambda: backends_on(found, ours) == 0, 30), \
        "the dropped storage's connections are still open on the server"


def test_a_heartbeat_that_cannot_be_written_is_said_once_and_its_recovery_too(fast_server,
                                                                              caplog):
    """The cause is real: the application role takes away its own rights on the table."""
    caplog.set_level(logging.INFO, logger="pgjob.heartbeat")
    found = fast_server.endpoint()
    storage = pgjob.optuna_storage(fast_server.home_path)
    study = optuna.create_study(study_name="unwritable", storage=storage)
    trial = study.ask()
    [trial_id] = trial_ids(found, "unwritable")
    assert until(lambda: beat(found, trial_id), 30)
    said = lambda level: [r.getMessage() for r in caplog.records  # noqa: E731
                          if r.name == "pgjob.heartbeat" and r.levelno == level]
    with found.connect() as conn:
        owned = conn.execute("select tableowner = current_user from pg_tables "
                             "where tablename = 'pgjob_heartbeats'").fetchone()
        assert owned == (True,), "the test needs pgjob_heartbeats owned by the app role"
        conn.execute("revoke all on pgjob_heartbeats from current_user")
        try:
            assert until(lambda: said(logging.WARNING), 30), "no warning for a failed beat"
            time.sleep(4 * 1)  # four more beats of the home's 1 s interval fail meanwhile
        finally:
            conn.execute("grant all on pgjob_heartbeats to current_user")
    assert until(lambda: any("written again" in m for m in said(logging.INFO)), 30)
    warnings = said(logging.WARNING)
    assert len(warnings) == 1, f"said {len(warnings)} times: {warnings}"
    assert "permission denied" in warnings[0] and "pgjob_heartbeats" in warnings[0]
    study.tell(trial, 0.0, skip_if_finished=True)  # the server may have judged it meanwhile
