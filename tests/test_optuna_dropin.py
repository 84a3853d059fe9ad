"""pgjob's Optuna storage as a drop-in for RDBStorage (issue 12), seen from outside: what the
server judges, what Optuna's own heartbeat arguments do, and many workers meeting a
database that has no Optuna tables yet. Real `pgjob serve`, real PostgreSQL, real Optuna.
tests/test_optuna_dropin_process.py has the process side (pickling, fork, threads, logs)."""
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

import pgjob
from conftest import FAST, Served, run_pgjob, set_settings
from dropin import beat, rows_for, start_script, states, trial_ids
from pgjob.waiting import until

pytestmark = [pytest.mark.pg,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

GRACE = FAST["grace_period"]

PLAIN_CLIENT = """
import sys, time, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, name, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
study = optuna.load_study(study_name=name, storage=url)
trial = study.ask()
x = trial.suggest_float("x", 0, 1)
print("running trial", trial.number, flush=True)
time.sleep(hold)
study.tell(trial, x)
print("told trial", trial.number, flush=True)
"""

PGJOB_WORKERS = """
import pathlib, sys, time, optuna, pgjob
optuna.logging.set_verbosity(optuna.logging.WARNING)
home, name, stop = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
study = optuna.load_study(study_name=name, storage=pgjob.optuna_storage(home, wait=60))
def objective(trial):
    time.sleep(0.2)
    return trial.suggest_float("x", 0, 1)
def until_stopped(study, trial):
    if stop.exists():
        study.stop()
study.optimize(objective, callbacks=[until_stopped], timeout=120)
print("workers stopped", flush=True)
"""


def test_a_plain_url_client_s_long_trial_completes_beside_pgjob_workers(fast_server,
                                                                       tmp_path):
    """A client that only has `pgjob url` sends no pgjob heartbeat; its trial, far longer
    than the grace period, must not be failed by the server's sweep (which judges the
    pgjob workers' trials in the same study all along)."""
    home, found, name = fast_server.home_path, fast_server.endpoint(), "plain-beside-pgjob"
    optuna.create_study(study_name=name, storage=pgjob.optuna_storage(home))
    url = run_pgjob("url", "--home", str(home), check=True).stdout.strip()
    stop = tmp_path / "stop"
    workers, workers_log = start_script(tmp_path, "workers", PGJOB_WORKERS, home, name, stop)
    try:
        assert until(lambda: states(found, name).get("COMPLETE", 0) >= 3, 60), \
            workers_log.read_text()
        client, client_log = start_script(tmp_path, "client", PLAIN_CLIENT, url, name,
                                          3 * GRACE + 2)
        client.wait(120)
        done_meanwhile = states(found, name).get("COMPLETE", 0)
    finally:
        stop.touch()
        workers.wait(60)
    said = client_log.read_text()
    assert client.returncode == 0, f"the plain client's tell failed:\n{said}"
    number = int(said.split("told trial")[1])
    with found.connect() as conn:
        state, started, completed = conn.execute(
            "select t.state::text, t.datetime_start, t.datetime_complete from trials t "
            "join studies s using (study_id) where s.study_name = %s and t.number = %s",
            (name, number)).fetchone()
    assert state == "COMPLETE"
    assert (completed - started).total_seconds() > 3 * GRACE  # the premise: it did last
    assert workers.returncode == 0, workers_log.read_text()
    assert done_meanwhile > 10  # the pgjob workers ran (and were judged) beside it


RACER = """
import pathlib, sys, time, optuna, pgjob
import alembic.migration, optuna.storages._rdb.models  # imported before, so that they race
optuna.logging.set_verbosity(optuna.logging.WARNING)
home, barrier, n = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
(barrier / f"ready-{n}").touch()
while not (barrier / "go").exists():
    time.sleep(0.002)
study = optuna.create_study(study_name="race", storage=pgjob.optuna_storage(home, wait=120),
                            load_if_exists=True)
study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
"""
RACERS = 32

OPTUNA_TABLES = """
select array_agg(relname::text order by relname) from pg_class
where relnamespace = 'public'::regnamespace and relkind = 'r'
  and relname in ('studies', 'trials', 'version_info', 'alembic_version', 'trial_heartbeats')
"""


@pytest.mark.slow  # 32 Python processes: 30-85 s on a busy 2-core machine
def test_32_workers_started_at_once_on_a_fresh_database_make_one_study(home_path, tmp_path):
    """The first clients make Optuna's tables; 32 of them at the same moment must neither
    collide nor make two studies of one name."""
    set_settings(home_path, workers=RACERS + 8)  # connections for all of them at once
    served = Served(home_path, tmp_path / "serve.log")
    found = served.endpoint()
    with found.connect() as conn:
        made = conn.execute(OPTUNA_TABLES).fetchone()[0]
    assert made is None, f"init or serve made Optuna's tables {made}: there is no race left"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    racers = [start_script(tmp_path, f"racer-{n}", RACER, home_path, barrier, n)
              for n in range(RACERS)]
    try:
        # every one has imported optuna and pgjob and waits; then all are let go at once
        assert until(lambda: len(list(barrier.glob("ready-*"))) == RACERS, 180, 0.2)
        (barrier / "go").touch()
        for process, _ in racers:
            process.wait(180)
    finally:
        for process, _ in racers:
            if process.poll() is None:
                process.kill()
    failed = [log.read_text() for process, log in racers if process.returncode != 0]
    assert not failed, f"{len(failed)} of {RACERS} failed; the first said:\n{failed[0]}"
    with found.connect() as conn:
        assert conn.execute("select study_name from studies").fetchall() == [("race",)]
        assert conn.execute("select count(*) from alembic_version").fetchone() == (1,)
    assert states(found, "race") == {"COMPLETE": RACERS}


@pytest.mark.parametrize("given", [{"heartbeat_interval": -1}, {"heartbeat_interval": 0},
                                   {"grace_period": 0}])
def test_optuna_s_heartbeat_arguments_are_refused_as_rdbstorage_refuses_them(fast_server,
                                                                             given):
    (argument, _), = given.items()
    with pytest.raises(ValueError, match=argument):
        pgjob.optuna_storage(fast_server.home_path, **given)


def test_the_heartbeat_interval_optuna_sees_is_the_one_passed(fast_server):
    home = fast_server.home_path
    assert pgjob.optuna_storage(home).get_heartbeat_interval() is None
    passed = pgjob.optuna_storage(home, heartbeat_interval=7, grace_period=20)
    assert passed.get_heartbeat_interval() == 7


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study")
def test_optuna_s_stale_trial_callback_is_called_for_a_stale_optuna_heartbeat(fast_server):
    """A trial whose Optuna heartbeat stopped (its worker hung) is failed by Optuna's
    fail_stale_trials, which calls the callback passed to pgjob's storage."""
    called = []
    storage = pgjob.optuna_storage(
        fast_server.home_path, heartbeat_interval=1, grace_period=2,
        heartbeat_stale_trial_callback=lambda study, trial: called.append(trial.number))
    study = optuna.create_study(study_name="optuna-heartbeats", storage=storage)
    trial = study.ask()
    storage.record_heartbeat(trial._trial_id)  # as Optuna's thread does; then it falls silent
    assert until(lambda: optuna.storages.fail_stale_trials(study) or called, 30, 0.5)
    assert called == [trial.number]
    assert states(fast_server.endpoint(), "optuna-heartbeats") == {"FAIL": 1}


def test_copies_of_running_trials_get_no_pgjob_heartbeat(fast_server):
    """study.add_trial and optuna.copy_study of a RUNNING trial make a trial that no process
    runs: it must get no pgjob heartbeat, or the server would judge it."""
    found = fast_server.endpoint()
    storage = pgjob.optuna_storage(fast_server.home_path)
    study = optuna.create_study(study_name="copied", storage=storage)
    live = study.ask()  # run by this process: beats, so we know beats are being written
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.RUNNING, params={"x": 0.5},
        distributions={"x": FloatDistribution(0, 1)}))
    optuna.copy_study(from_study_name="copied", from_storage=storage, to_storage=storage,
                      to_study_name="copied-again")
    live_id, added_id = trial_ids(found, "copied")
    copy_ids = trial_ids(found, "copied-again")
    assert len(copy_ids) == 2 and states(found, "copied-again") == {"RUNNING": 2}
    first = until(lambda: beat(found, live_id), 30)
    assert first, "the trial this process runs got no pgjob heartbeat"
    # two more beats after the copies were made: any beat for them would be written by now
    second = until(lambda: (b := beat(found, live_id)) > first and b, 30)
    assert second and until(lambda: beat(found, live_id) > second, 30)
    assert rows_for(found, [added_id, *copy_ids]) == []
    study.tell(live, 0.0)
