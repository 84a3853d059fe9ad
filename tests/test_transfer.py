"""`pgjob export` / `pgjob import`: studies moved between journal homes, rdb homes, SQLite
files and journal files keep every trial as it was; nothing is merged, overwritten or
followed through a planted link.

Three real servers for the whole module: two journal homes and an rdb home. Tests use
studies of their own names.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

import pgjob
from conftest import Served, run_pgjob, set_settings

pytestmark = pytest.mark.pg


@pytest.fixture(scope="module")
def homes(template_home, tmp_path_factory):
    """journal_a, rdb and journal_b: one `pgjob serve` each, for the module."""
    started = {}
    try:
        for name, storage in (("journal_a", "journal"), ("rdb", "rdb"),
                              ("journal_b", "journal")):
            base = tmp_path_factory.mktemp(name)
            path = base / "home"
            shutil.copytree(template_home, path, symlinks=True)
            set_settings(path, storage=storage)
            started[name] = Served(path, base / "serve.log")
            Served.started.remove(started[name])  # it outlives each test
        for served in started.values():
            served.endpoint()
        yield SimpleNamespace(**{name: s.home_path for name, s in started.items()})
    finally:
        for served in started.values():
            if served.process.poll() is None:
                served.stop()
            served.process.wait(60)


def fill(storage, prefix: str) -> None:
    """Two studies with what a copy could lose: every state, three kinds of parameter,
    user attributes of study and trial, intermediate values, two objectives."""
    single = optuna.create_study(storage=storage, study_name=f"{prefix}-single")
    single.set_user_attr("owner", "ann")
    single.enqueue_trial({"x": 0.5, "n": 3, "kind": "b"})

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        n = trial.suggest_int("n", 1, 5)
        kind = trial.suggest_categorical("kind", ["a", "b"])
        trial.set_user_attr("note", f"{kind}{n}")
        trial.report(x / 2, step=0)
        if trial.number == 2:
            raise optuna.TrialPruned()
        if trial.number == 3:
            raise ValueError("this trial fails")
        return x * n

    single.optimize(objective, n_trials=5, catch=(ValueError,))
    single.enqueue_trial({"x": 0.25})  # stays WAITING
    multi = optuna.create_study(storage=storage, study_name=f"{prefix}-multi",
                                directions=["minimize", "maximize"])
    multi.optimize(lambda t: (t.suggest_float("a", 0, 1), t.suggest_float("b", -1, 1)),
                   n_trials=3)


def contents(storage, names) -> dict:
    """What a user sees of each study, for comparing copies."""
    seen = {}
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        seen[name] = {
            "directions": [d.name for d in study.directions],
            "user_attrs": study.user_attrs,
            "trials": [(t.number, t.state.name, t.params, t.values, t.user_attrs,
                        t.intermediate_values, t.datetime_start, t.datetime_complete)
                       for t in study.trials]}
    return seen


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def journal_file(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


def copied_lines(done) -> list[str]:
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()


def refused(done, code: int = 4) -> str:
    """The one-line error of a refused command."""
    assert done.returncode == code, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pgjob: error: "), done.stderr
    return lines[0]


def test_studies_go_round_trip_through_every_kind_of_storage(homes, tmp_path):
    names = ["rt-single", "rt-multi"]
    fill(pgjob.optuna_storage(homes.journal_a), "rt")
    original = contents(pgjob.optuna_storage(homes.journal_a), names)
    states = {t[1] for t in original["rt-single"]["trials"]}
    assert states == {"COMPLETE", "PRUNED", "FAIL", "WAITING"}

    db = tmp_path / "results.db"  # journal home -> SQLite file: every study by default
    lines = copied_lines(run_pgjob("export", "--home", str(homes.journal_a), str(db)))
    assert sorted(lines) == sorted([f"copied 'rt-single' (6 trials) to {db}",
                                    f"copied 'rt-multi' (3 trials) to {db}"])
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["results.db"]  # no work folder left
    assert contents(sqlite_url(db), names) == original  # plain Optuna reads it

    # SQLite file -> rdb home; then rdb home -> journal file (these studies only)
    copied_lines(run_pgjob("import", "--home", str(homes.rdb), f"sqlite:///{db}"))
    assert contents(pgjob.optuna_storage(homes.rdb), names) == original
    log = tmp_path / "results.log"
    lines = copied_lines(run_pgjob("export", "--home", str(homes.rdb), "--study", "rt-single",
                                   "--study", "rt-multi", str(log)))
    assert len(lines) == 2
    assert contents(journal_file(log), names) == original

    # journal file -> another journal home, which workers then go on with
    lines = copied_lines(run_pgjob("import", "--home", str(homes.journal_b), str(log)))
    assert lines[0].endswith(f"to the home {homes.journal_b}")
    moved = pgjob.optuna_storage(homes.journal_b)
    assert contents(moved, names) == original
    study = optuna.load_study(study_name="rt-single", storage=moved)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)  # runs the WAITING one
    assert [t.params["x"] for t in study.trials if t.number == 5] == [0.25]
    assert study.trials[5].state == TrialState.COMPLETE


def test_a_target_that_has_the_study_already_is_refused_and_left_as_it_was(homes, tmp_path):
    storage = pgjob.optuna_storage(homes.rdb)
    for name in ("clash", "clash-2"):
        optuna.create_study(storage=storage, study_name=name).optimize(
            lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    db = tmp_path / "mine.db"
    copied_lines(run_pgjob("export", "--home", str(homes.rdb), "--study", "clash", str(db)))
    before = db.read_bytes()

    error = refused(run_pgjob("export", "--home", str(homes.rdb), "--study", "clash",
                              "--study", "clash-2", str(db)))
    assert f"{db} already has a study named 'clash'" in error
    assert "nothing was copied" in error and "--study" in error
    assert db.read_bytes() == before  # not even clash-2 went in

    # an existing Optuna file takes studies it does not have yet
    copied_lines(run_pgjob("export", "--home", str(homes.rdb), "--study", "clash-2", str(db)))
    assert {s.study_name for s in optuna.get_all_study_summaries(sqlite_url(db))} == {
        "clash", "clash-2"}

    # home to home, into a journal home: once, then refused
    copied_lines(run_pgjob("export", "--home", str(homes.rdb), "--study", "clash",
                           "--to-home", str(homes.journal_b)))
    error = refused(run_pgjob("import", "--home", str(homes.journal_b), "--study", "clash",
                              "--from-home", str(homes.rdb)))
    assert f"the home {homes.journal_b} already has a study named 'clash'" in error
    trials = optuna.load_study(study_name="clash",
                               storage=pgjob.optuna_storage(homes.journal_b)).trials
    assert len(trials) == 2


def test_a_study_with_running_trials_is_copied_only_when_asked(homes, tmp_path):
    study = optuna.create_study(storage=pgjob.optuna_storage(homes.rdb), study_name="busy")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    running = study.ask()
    db = tmp_path / "busy.db"

    error = refused(run_pgjob("export", "--home", str(homes.rdb), "--study", "busy", str(db)))
    assert f"running in the home {homes.rdb}: 'busy' (1 RUNNING)" in error
    assert "--allow-running" in error
    assert not db.exists()

    copied_lines(run_pgjob("export", "--home", str(homes.rdb), "--study", "busy",
                           "--allow-running", str(db)))
    copy = optuna.load_study(study_name="busy", storage=sqlite_url(db))
    assert [t.state for t in copy.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    study.tell(running, 0.5)


def test_a_study_that_cannot_be_copied_leaves_nothing_of_itself(homes, tmp_path):
    storage = pgjob.optuna_storage(homes.rdb)
    optuna.create_study(storage=storage, study_name="fine").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    broken = optuna.create_study(storage=storage, study_name="broken")
    trial = broken.ask()  # two values in a one-objective study: copy_study refuses it
    storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [1.0, 2.0])
    picked = ("--study", "fine", "--study", "broken")

    db = tmp_path / "new.db"  # a new file: all or nothing
    done = run_pgjob("export", "--home", str(homes.rdb), *picked, str(db))
    error = refused(done, code=3)
    assert "copying 'broken' failed: The added trial has 2 values" in error
    assert done.stdout == "" and list(tmp_path.iterdir()) == []

    # a home keeps the studies copied whole before the failure, and nothing of the other
    done = run_pgjob("export", "--home", str(homes.rdb), *picked, "--to-home",
                     str(homes.journal_b))
    refused(done, code=3)
    assert done.stdout == f"copied 'fine' (1 trial) to the home {homes.journal_b}\n"
    names = {s.study_name for s in pgjob.optuna_storage(homes.journal_b).get_all_studies()}
    assert "fine" in names and "broken" not in names


def test_no_planted_link_is_followed_and_no_other_file_written_into(homes, tmp_path):
    loot = tmp_path / "elsewhere"
    loot.mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "results.db").symlink_to(loot / "got-it.db")
    error = refused(run_pgjob("export", "--home", str(homes.rdb), str(shared / "results.db")))
    assert "is a symbolic link" in error
    assert list(loot.iterdir()) == []

    notes = shared / "notes.db"
    notes.write_text("my notes\n")
    error = refused(run_pgjob("export", "--home", str(homes.rdb), str(notes)))
    assert f"{notes} is neither a SQLite database nor an Optuna journal file" in error
    assert notes.read_text() == "my notes\n"


def test_files_that_are_not_study_storages_are_one_clear_line(homes, tmp_path):
    home = str(homes.rdb)
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("create table t (x)").connection.commit()
    text = tmp_path / "notes.log"
    text.write_text('{"not": "a journal entry"}\n')
    deep = tmp_path / "deep.log"  # nested past what Python's JSON parser can follow
    deep.write_text('{"op_code": ' + "[" * 100_000 + "\n")
    damaged = tmp_path / "damaged.log"  # a journal whose second entry is nested so
    damaged.write_text(json.dumps({"op_code": 0, "worker_id": "w", "study_name": "s",
                                   "directions": [1]}) + "\n" + deep.read_text())
    secret = tmp_path / "secret.db"
    shutil.copy(plain, secret)
    secret.chmod(0)
    cases = [
        (tmp_path / "missing.db", "no file at", "name a SQLite file or an Optuna journal"),
        (plain, "is a SQLite database but no Optuna storage", "name the file"),
        (text, "is neither a SQLite database nor an Optuna journal file", "name the file"),
        (deep, "is neither a SQLite database nor an Optuna journal file", "name the file"),
        (damaged, "could not be read as an Optuna journal", "name the file"),
        (tmp_path, "is a folder", "name a file"),
    ]
    if os.geteuid() != 0:
        cases.append((secret, "cannot read", "make the file readable"))
    for path, what, todo in cases:
        error = refused(run_pgjob("import", "--home", home, str(path)))
        assert what in error and todo in error, (path, error)
    error = refused(run_pgjob("export", "--home", home, str(tmp_path / "study.txt")))
    assert "cannot tell from its name" in error and "--format sqlite" in error
    error = refused(run_pgjob("import", "--home", home, "postgresql://elsewhere/db"))
    assert "optuna.copy_study" in error


@pytest.mark.root
def test_root_exports_as_the_homes_account_and_writes_nothing_of_roots(tmp_path):
    """Started as root, export acts as the home's owner: the file is that account's, a
    folder only root can write is refused, and a link the account planted is not followed
    to root's file."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="pgjob-root-", dir="/var/tmp"))
    try:
        work.chmod(0o1777)
        home = work / "home"
        run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", "--storage",
                  "journal", check=True)
        owner = home.stat().st_uid
        served = Served(home, work / "serve.log")
        served.endpoint()
        fill(pgjob.optuna_storage(home), "root")  # as root, in this process

        out = work / "out"
        out.mkdir()
        out.chmod(0o1777)
        db = out / "results.db"
        copied_lines(run_pgjob("export", "--home", str(home), str(db)))
        assert db.stat().st_uid == owner and stat.S_IMODE(db.stat().st_mode) == 0o600

        roots = work / "roots"  # root's: others may enter, not write
        roots.mkdir(mode=0o755)
        error = refused(run_pgjob("export", "--home", str(home), str(roots / "r.db")))
        assert "cannot create" in error and "pgjob runs as postgres" in error
        os.chmod(tmp_path, 0o700)  # root's, closed
        error = refused(run_pgjob("export", "--home", str(home), str(tmp_path / "r.db")))
        assert "cannot reach" in error and "pgjob runs as postgres" in error
        assert list(roots.iterdir()) == list(tmp_path.iterdir()) == []

        victim = tmp_path / "victim.db"
        shutil.copy(db, victim)  # root's, and an Optuna storage
        before = victim.read_bytes()
        planted = out / "planted.db"
        planted.symlink_to(victim)
        os.lchown(planted, owner, -1)
        error = refused(run_pgjob("export", "--home", str(home), str(planted)))
        assert "is a symbolic link" in error and victim.read_bytes() == before
        assert served.stop() == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)
