"""Journal homes (issue 13) from a worker's side: `pgjob init --storage journal`, the worker
scripts of an rdb home unchanged, the storage following a restarted server without doing
anything twice, pickling and fork, and the refusals a user meets (`pgjob url`, a worker
set to the other storage). Real `pgjob serve`, real PostgreSQL, real Optuna processes."""
import multiprocessing
import os
import pickle
import shutil
import signal
import time
from concurrent.futures import ProcessPoolExecutor

import optuna
import pytest

import pgjob
from conftest import FAST, Served, run_pgjob, set_settings
from dropin import start_script
from pgjob.errors import UsageError
from pgjob.home import open_home
from pgjob.waiting import until

pytestmark = pytest.mark.pg

WORKER = """
import sys, time, optuna, pgjob
optuna.logging.set_verbosity(optuna.logging.WARNING)
name, n, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
study = optuna.create_study(study_name=name, storage=pgjob.optuna_storage(wait=120),
                            load_if_exists=True)
def objective(trial):
    time.sleep(pause)
    return trial.suggest_float("x", -1, 1) ** 2
study.optimize(objective, n_trials=n)
print("done", type(study._storage).__name__, flush=True)
"""


def quadratic(trial):
    return trial.suggest_float("x", -1, 1) ** 2


def optimize_three(study):
    study.optimize(quadratic, n_trials=3)
    return os.getpid()


def journal_rows(found) -> int:
    with found.connect() as conn:
        return conn.execute("select count(*) from pgjob_journal").fetchone()[0]


def has_table(found, name: str) -> bool:
    with found.connect() as conn:
        return conn.execute("select to_regclass(%s) is not null", (name,)).fetchone()[0]


def completed(storage, study: str) -> int:
    studies = [s for s in storage.get_all_studies() if s.study_name == study]
    return studies and sum(t.state.name == "COMPLETE" for t in storage.get_all_trials(
        studies[0]._study_id, deepcopy=False))


def states(home, study: str) -> dict[str, int]:
    """What a new worker sees of a study: its trials' states, counted."""
    found = optuna.load_study(study_name=study, storage=pgjob.optuna_storage(home, wait=30))
    counts: dict[str, int] = {}
    for trial in found.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def test_init_storage_journal_is_kept_and_url_says_what_to_use(journal_server, template_home,
                                                               tmp_path):
    home = journal_server.home_path
    done = run_pgjob("url", "--home", str(home))
    assert done.returncode != 0 and not done.stdout
    assert "journal" in done.stderr and "pgjob.optuna_storage()" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    tunnel = run_pgjob("tunnel", "--home", str(home), "--via", "nobody@nowhere.invalid",
                       "--format", "sqlalchemy")
    assert tunnel.returncode == done.returncode and tunnel.stderr == done.stderr  # no ssh
    libpq = run_pgjob("url", "--home", str(home), "--format", "libpq", check=True)
    assert libpq.stdout.startswith("postgresql://")
    # `pgjob init --storage journal` on an existing home keeps the choice in pgjob.toml
    other = tmp_path / "home"
    shutil.copytree(template_home, other, symlinks=True)
    run_pgjob("init", "--home", str(other), "--storage", "journal", check=True)
    assert 'storage = "journal"' in (other / "pgjob.toml").read_text()
    assert open_home(other).settings().storage == "journal"


def test_the_same_worker_scripts_share_one_journal_study(journal_server, tmp_path):
    found = journal_server.endpoint()
    env_home = {"PGJOB_HOME": str(journal_server.home_path)}
    os.environ.update(env_home)
    try:
        workers = [start_script(tmp_path, f"w{i}", WORKER, "shared", 15, 0.01)
                   for i in range(3)]
        for process, log in workers:
            assert process.wait(120) == 0, log.read_text()
            assert "done PgJobJournalStorage" in log.read_text()
    finally:
        for name in env_home:
            os.environ.pop(name)
    assert states(journal_server.home_path, "shared") == {"COMPLETE": 45}
    assert journal_rows(found) > 45 * 3
    # the study is only in the journal: no RDBStorage table was made beside it
    assert not has_table(found, "public.trials")
    assert has_table(found, "public.pgjob_heartbeats")


def test_a_worker_carries_on_across_a_server_restart_without_doing_anything_twice(
        template_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(template_home, home, symlinks=True)
    set_settings(home, storage="journal", **FAST)
    first = Served(home, tmp_path / "serve.log")
    first.endpoint()
    os.environ["PGJOB_HOME"] = str(home)
    try:
        worker, log = start_script(tmp_path, "worker", WORKER, "moving", 40, 0.1)
    finally:
        os.environ.pop("PGJOB_HOME")
    watcher = pgjob.optuna_storage(home, wait=30)
    assert until(lambda: completed(watcher, "moving"), 60, interval=0.2), log.read_text()
    watcher.pgjob_backend.close()
    assert first.stop(signal.SIGTERM) == 0
    second = Served(home, tmp_path / "serve.log")
    second.endpoint()
    assert worker.wait(180) == 0, log.read_text()
    assert "waiting for it to come back" in log.read_text()
    trials = optuna.load_study(study_name="moving",
                               storage=pgjob.optuna_storage(home, wait=30)).trials
    assert [t.number for t in trials] == list(range(40))
    assert {t.state.name for t in trials} == {"COMPLETE"}


def test_the_storage_and_a_study_pickle_and_run_in_spawned_and_forked_pools(journal_server):
    home = journal_server.home_path
    storage = pgjob.optuna_storage(home)
    study = optuna.create_study(study_name="pooled", storage=storage)
    study.optimize(quadratic, n_trials=1)
    again = pickle.loads(pickle.dumps(storage))
    assert type(again) is type(storage)
    assert "pooled" in [s.study_name for s in again.get_all_studies()]
    for method in ("spawn", "fork"):
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method)) as pool:
            pids = list(pool.map(optimize_three, [study, study], timeout=120))
        assert os.getpid() not in pids
    study.optimize(quadratic, n_trials=1)  # the parent's storage still works after fork
    assert states(home, "pooled") == {"COMPLETE": 1 + 2 * 2 * 3 + 1}


def test_a_worker_set_to_the_other_storage_is_refused_not_split_off(journal_server,
                                                                   monkeypatch):
    home = journal_server.home_path
    optuna.create_study(study_name="kept", storage=pgjob.optuna_storage(home))
    monkeypatch.setenv("PGJOB_STORAGE", "rdb")
    with pytest.raises(UsageError, match="holds 'journal' studies"):
        pgjob.optuna_storage(home, wait=10)
    assert not has_table(journal_server.endpoint(), "public.trials")


def test_an_rdb_home_with_studies_refuses_a_journal_worker(server, monkeypatch):
    optuna.create_study(study_name="rdb", storage=pgjob.optuna_storage(server.home_path))
    monkeypatch.setenv("PGJOB_STORAGE", "journal")
    with pytest.raises(UsageError, match="holds 'rdb' studies"):
        pgjob.optuna_storage(server.home_path, wait=10)
    assert not has_table(server.endpoint(), "public.pgjob_journal")


def test_optuna_s_own_heartbeat_arguments_are_refused_on_a_journal_home(journal_server):
    with pytest.raises(UsageError, match="heartbeat_interval.*always on"):
        pgjob.optuna_storage(journal_server.home_path, heartbeat_interval=10)


def test_a_driver_waits_for_other_workers_results_without_polling(journal_server, tmp_path):
    home = journal_server.home_path
    driver = pgjob.optuna_storage(home)
    optuna.create_study(study_name="awaited", storage=driver)
    assert driver.wait_for_change(0.5) is False  # nobody wrote
    os.environ["PGJOB_HOME"] = str(home)
    try:
        worker, log = start_script(tmp_path, "late", WORKER, "awaited", 1, 0.0)
    finally:
        os.environ.pop("PGJOB_HOME")
    started = time.monotonic()
    assert driver.wait_for_change(60) is True, log.read_text()
    assert time.monotonic() - started < 30
    assert worker.wait(60) == 0, log.read_text()
    with journal_server.endpoint().connect() as conn:
        listening = conn.execute("select count(*) from pg_stat_activity "
                                 "where query like 'listen%'").fetchone()[0]
    assert listening >= 1  # asleep on LISTEN, not reading the study in a loop


def test_a_large_study_is_snapshotted_rarely_and_a_new_worker_starts_from_it(journal_server,
                                                                              monkeypatch):
    import optuna.storages.journal._storage as optuna_journal

    pickled = []
    dumps = optuna_journal.pickle.dumps
    monkeypatch.setattr(optuna_journal.pickle, "dumps",
                        lambda obj, *a, **k: pickled.append(1) or dumps(obj, *a, **k))
    home = journal_server.home_path
    study = optuna.create_study(study_name="large", storage=pgjob.optuna_storage(home))
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trials([optuna.trial.create_trial(params={"x": i / 3000}, distributions=dist,
                                                value=i) for i in range(3000)])
    # Optuna offers a snapshot every 100 trials; pgjob lets it pickle only the ones it saves
    assert 1 <= len(pickled) <= 3
    with journal_server.endpoint().connect() as conn:
        upto = conn.execute("select upto from pgjob_journal_snapshots").fetchone()[0]
    assert upto >= 2000
    study.optimize(quadratic, n_trials=2)  # logs after the snapshot
    from pgjob.journal import PgJournalBackend

    read_from = []
    read_logs = PgJournalBackend.read_logs
    monkeypatch.setattr(PgJournalBackend, "read_logs",
                        lambda self, n: read_from.append(n) or read_logs(self, n))
    joined = optuna.load_study(study_name="large", storage=pgjob.optuna_storage(home))
    assert read_from[0] == upto  # the snapshot, then only the logs after it
    assert [(t.number, t.value) for t in joined.trials] == [
        (t.number, t.value) for t in study.trials]
