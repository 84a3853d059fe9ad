"""Password rotation that never locks anyone out: a rotation that cannot write its new
password changes nothing, and one cut short after the server took the new password is
finished by the next `pgjob rotate-password` or `pgjob init`."""
import dataclasses
import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import Served, run_pgjob, trial_states
from pgjob import endpoint, passwords
from pgjob.errors import PgJobError
from pgjob.home import open_home
from pgjob.waiting import until

pytestmark = pytest.mark.pg


def url_works(home_path) -> bool:
    """`pgjob url` connects and authenticates with app.pgpass, as every worker does."""
    return run_pgjob("url", "--home", str(home_path)).returncode == 0


def cut_short_after_alter_role(server, home_path) -> str:
    """What a rotate-password killed between ALTER ROLE and the rename leaves behind:
    the new password in its pending file, the server using it, app.pgpass still old."""
    found = server.endpoint()
    password = passwords.generate()
    line = passwords.passfile_line(found.user, password)
    fd = os.open(home_path / "secrets" / "app.pgpass.pending",
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(line)
    with found.connect() as conn:
        passwords.set_password(conn, found.user, password)
    assert not url_works(home_path)  # locked out, until this is finished
    return line


def one_line_error(done) -> str:
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    return done.stderr.strip().splitlines()[0]


def test_rotation_into_read_only_secrets_fails_clearly_and_the_study_goes_on(server,
                                                                            home_path):
    secrets = home_path / "secrets"
    old = (secrets / "app.pgpass").read_text()
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, optuna, pgjob\n"
         "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
         "s = optuna.create_study(storage=pgjob.optuna_storage(sys.argv[1]), study_name='r')\n"
         "s.optimize(lambda t: time.sleep(0.1) or t.suggest_float('x', 0, 1), n_trials=40)\n",
         str(home_path)], stderr=subprocess.PIPE, text=True)
    found = server.endpoint()
    assert until(lambda: sum(trial_states(found, "r").values()) >= 5, 60)
    secrets.chmod(0o500)
    try:
        done = run_pgjob("rotate-password", "--home", str(home_path))
        assert done.returncode == 3
        assert "could not write the new password" in one_line_error(done)
        assert url_works(home_path)
    finally:
        secrets.chmod(0o700)
    assert (secrets / "app.pgpass").read_text() == old
    assert sorted(p.name for p in secrets.iterdir()) == sorted(
        ["app.pgpass", "superuser.pgpass", "ca.crt", "ca.key", "journal.key"])
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err


def test_a_rotation_cut_short_after_alter_role_is_finished_by_init(server, home_path):
    line = cut_short_after_alter_role(server, home_path)
    run_pgjob("init", "--home", str(home_path), check=True)
    assert url_works(home_path)
    passfile = home_path / "secrets" / "app.pgpass"
    assert passfile.read_text() == line and stat.S_IMODE(passfile.stat().st_mode) == 0o600
    assert not (home_path / "secrets" / "app.pgpass.pending").exists()


def test_a_rotation_cut_short_is_finished_by_the_next_rotate_password(server, home_path):
    old = (home_path / "secrets" / "app.pgpass").read_text()
    line = cut_short_after_alter_role(server, home_path)
    run_pgjob("rotate-password", "--home", str(home_path), check=True)
    assert url_works(home_path)
    assert (home_path / "secrets" / "app.pgpass").read_text() not in (old, line)
    assert not (home_path / "secrets" / "app.pgpass.pending").exists()


def test_a_rotation_cut_short_while_nothing_serves_is_finished_by_init(server, home_path,
                                                                      tmp_path):
    cut_short_after_alter_role(server, home_path)
    server.stop()
    run_pgjob("init", "--home", str(home_path), check=True)
    assert not (home_path / "secrets" / "app.pgpass.pending").exists()
    again = Served(home_path, tmp_path / "again.log")
    with again.endpoint().connect() as conn:  # with app.pgpass
        assert conn.execute("select current_user").fetchone() == ("optuna",)
    again.stop()


def test_a_rotation_cut_short_while_nothing_serves_is_finished_by_the_next_serve(
        server, home_path, tmp_path):
    line = cut_short_after_alter_role(server, home_path)
    server.stop()
    again = Served(home_path, tmp_path / "again.log")
    again.endpoint()  # it serves, and workers (app.pgpass) get in
    assert url_works(home_path)
    assert (home_path / "secrets" / "app.pgpass").read_text() == line
    assert not (home_path / "secrets" / "app.pgpass.pending").exists()
    again.stop()


def test_a_pending_password_the_server_never_took_is_dropped_by_init(server, home_path):
    passfile = home_path / "secrets" / "app.pgpass"
    old = passfile.read_text()
    pending = home_path / "secrets" / "app.pgpass.pending"
    pending.write_text(passwords.passfile_line("optuna", passwords.generate()))
    pending.chmod(0o600)
    an_hour_ago = time.time() - 3600  # left by a rotation that died, not one under way
    os.utime(pending, (an_hour_ago, an_hour_ago))
    run_pgjob("init", "--home", str(home_path), check=True)
    assert not pending.exists() and passfile.read_text() == old
    assert url_works(home_path)


def test_the_new_password_is_on_disk_before_the_server_has_it(server, home_path,
                                                              monkeypatch):
    def promotion_fails(home):
        raise PgJobError("the rename failed")
    monkeypatch.setattr(passwords, "_promote", promotion_fails)
    server.endpoint()
    with pytest.raises(PgJobError, match="the rename failed"):
        passwords.rotate(open_home(home_path))
    assert not url_works(home_path)  # the server has the new password, app.pgpass not
    pending = home_path / "secrets" / "app.pgpass.pending"
    assert stat.S_IMODE(pending.stat().st_mode) == 0o600
    published = endpoint.read(open_home(home_path))
    with dataclasses.replace(published, passfile=str(pending)).connect() as conn:
        assert conn.execute("select current_user").fetchone() == ("optuna",)
    monkeypatch.undo()
    run_pgjob("rotate-password", "--home", str(home_path), check=True)
    assert url_works(home_path) and not pending.exists()
