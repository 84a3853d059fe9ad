"""Backups to trust: private from their first byte in any folder, never rotated away,
from a home at any path; a failure is one clear line.

A pg_dump stand-in (a shell script in a pg_bin folder of links to the real programs) runs
the real pg_dump and shows what the backup folder holds while it runs.
"""
import os
import shutil
import time
from pathlib import Path

import optuna
import pytest

from conftest import Served, run_pgjob
from pgjob.home import open_home

pytestmark = pytest.mark.pg

SPY = """#!/bin/sh
look() {{ find "$SPY_DIR" -maxdepth 1 -type f -printf "$1 %m %U %s %p\\n" >> "$SPY_LOG"; }}
look before
"{real}/pg_dump" "$@"
rc=$?
look written  # pg_dump is done; pgjob has not touched the file since
[ -n "$SPY_REMOVES" ] && find "$SPY_DIR" -maxdepth 1 -type f -delete
exit $rc
"""


@pytest.fixture
def spy_bin(home_path, tmp_path) -> Path:
    real = Path(open_home(home_path).settings().pg_bin)
    folder = tmp_path / "pg_bin"
    folder.mkdir()
    for program in real.iterdir():
        (folder / program.name).symlink_to(program)
    (folder / "pg_dump").unlink()
    (folder / "pg_dump").write_text(SPY.format(real=real))
    (folder / "pg_dump").chmod(0o755)
    return folder


@pytest.fixture
def shared(tmp_path) -> Path:
    """A folder everyone may write, like /tmp."""
    path = tmp_path / "shared"
    path.mkdir()
    path.chmod(0o1777)
    return path


def backup(home_path, *args, env=None):
    before = os.umask(0o022)  # the usual umask: a file made without a mode is world-readable
    try:
        return run_pgjob("backup", "--home", str(home_path), *args, env=env)
    finally:
        os.umask(before)


def predictable_names(pattern: str, seconds: float = 40):
    """The names pgjob used to give a dump started within the next `seconds`, by the ms."""
    start = time.time() - 1
    for ms in range(int(seconds * 1000)):
        now = start + ms / 1000
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now % 1 * 1000):03d}"
        yield pattern.format(stamp)


def written(done) -> Path:
    return Path(done.stdout.split("backup written: ", 1)[1].strip())


def one_line_error(done) -> str:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[0]


def test_a_dump_is_private_and_ours_from_the_moment_it_exists(server, home_path, spy_bin,
                                                             shared, tmp_path):
    log = tmp_path / "spy.log"
    done = backup(home_path, "--out", str(shared),
                  env={"PGJOB_PG_BIN": str(spy_bin), "SPY_DIR": str(shared),
                       "SPY_LOG": str(log)})
    assert done.returncode == 0, done.stderr
    seen = [line.split(maxsplit=4) for line in log.read_text().splitlines()]
    assert any(when == "written" and int(size) > 0 for when, _, _, size, _ in seen), seen
    for when, mode, uid, size, name in seen:
        assert (mode, int(uid)) == ("600", os.getuid()), (when, mode, uid, name)
    made = written(done)
    assert made.parent == shared and oct(made.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in shared.iterdir()] == [made.name]  # nothing left half-written


def test_links_planted_at_the_old_predictable_names_receive_nothing(server, home_path,
                                                                   shared, tmp_path):
    loot = tmp_path / "loot"
    loot.mkdir()
    for name in predictable_names(".optuna-{}.dump.partial"):
        (shared / name).symlink_to(loot / "got-it")
    done = backup(home_path, "--out", str(shared))
    assert done.returncode == 0, done.stderr
    assert list(loot.iterdir()) == []
    made = written(done)
    assert made.read_bytes().startswith(b"PGDMP") and not made.is_symlink()


def test_a_dump_that_vanishes_while_written_is_one_clear_error(server, home_path, spy_bin,
                                                              tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = backup(home_path, "--out", str(out),
                  env={"PGJOB_PG_BIN": str(spy_bin), "SPY_DIR": str(out),
                       "SPY_LOG": str(tmp_path / "spy.log"), "SPY_REMOVES": "1"})
    assert done.returncode == 3
    assert one_line_error(done).startswith(f"pgjob: error: could not write a backup into {out}")


def test_a_dump_whose_name_is_taken_is_one_clear_error_and_leaves_nothing(server, home_path,
                                                                         tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in predictable_names("optuna-{}.dump"):
        (out / name).mkdir()
    taken = set(out.iterdir())
    done = backup(home_path, "--out", str(out))
    assert done.returncode == 3
    assert "could not write a backup" in one_line_error(done)
    assert set(out.iterdir()) == taken  # no half-written file left


def test_backups_keep_0_never_deletes_the_backup_just_written(server, home_path):
    first = backup(home_path)
    assert first.returncode == 0, first.stderr
    settings = home_path / "pgjob.toml"
    settings.write_text(settings.read_text().replace("backups_keep = 5", "backups_keep = 0"))
    done = backup(home_path)
    if done.returncode == 4:  # refusing the setting is as good: nothing is lost either
        assert "backups_keep" in one_line_error(done)
        assert written(first).is_file()
        return
    assert done.returncode == 0, done.stderr
    made = written(done)
    assert made.is_file() and made.read_bytes().startswith(b"PGDMP")


def test_a_home_whose_path_has_a_quote_and_a_space_backs_up_and_restores(template_home,
                                                                        tmp_path):
    home = tmp_path / "Ann's 100% studies" / "home"
    shutil.copytree(template_home, home, symlinks=True)
    served = Served(home, tmp_path / "serve.log")
    study = optuna.create_study(storage=served.endpoint().sqlalchemy_url(), study_name="q")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    expected = [t.params for t in study.trials]
    done = backup(home)
    assert done.returncode == 0, done.stderr
    served.stop()

    restored = tmp_path / "the 'restored' home"
    run_pgjob("restore", str(written(done)), "--home", str(restored),
              "--allow", "127.0.0.1/32", check=True)
    again = Served(restored, tmp_path / "restored.log")
    loaded = optuna.load_study(study_name="q", storage=again.endpoint().sqlalchemy_url())
    assert [t.params for t in loaded.trials] == expected
    again.stop()


def test_a_journal_home_restores_as_a_journal_home_without_its_old_snapshot(template_home,
                                                                           tmp_path, caplog,
                                                                           monkeypatch):
    import pickle

    import pgjob
    from conftest import set_settings
    from pgjob import journal

    home = tmp_path / "journal-home"
    shutil.copytree(template_home, home, symlinks=True)
    set_settings(home, storage="journal")
    served = Served(home, tmp_path / "serve.log")
    served.endpoint()
    storage = pgjob.optuna_storage(home)
    study = optuna.create_study(storage=storage, study_name="j")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=4)
    expected = [(t.params, t.value, t.state) for t in study.trials]
    monkeypatch.setattr(journal, "SNAPSHOT_MIN_LOGS", 0)  # as a large study would have
    storage.pgjob_backend.save_snapshot(pickle.dumps(storage._replay_result))
    storage.pgjob_backend.close()
    with served.endpoint().connect() as conn:
        assert conn.execute("select count(*) from pgjob_journal_snapshots").fetchone() == (1,)
    done = backup(home)
    assert done.returncode == 0, done.stderr
    served.stop()

    restored = tmp_path / "restored"
    made = run_pgjob("restore", str(written(done)), "--home", str(restored),
                     "--allow", "127.0.0.1/32", check=True)
    assert "(storage = 'journal')" in made.stdout
    assert open_home(restored).settings().storage == "journal"
    again = Served(restored, tmp_path / "restored.log")
    with again.endpoint().connect() as conn:  # signed with the old home's key: dropped
        assert conn.execute("select count(*) from pgjob_journal_snapshots").fetchone() == (0,)
    caplog.set_level("WARNING", logger="pgjob.journal")
    loaded = optuna.load_study(study_name="j", storage=pgjob.optuna_storage(restored))
    assert [(t.params, t.value, t.state) for t in loaded.trials] == expected
    assert not [r for r in caplog.records if r.name.startswith("pgjob")], caplog.text
    again.stop()
