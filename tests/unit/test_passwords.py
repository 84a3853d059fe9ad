"""Settling a rotation that was cut short, with stand-in probes for the server's answer."""
import os
import time

import pytest

from pgjob import passwords
from pgjob.endpoint import Endpoint
from pgjob.errors import PgJobError
from pgjob.home import Home

OLD = "*:*:*:optuna:old\n"
NEW = "*:*:*:optuna:new\n"


@pytest.fixture
def home(tmp_path) -> Home:
    home = Home(tmp_path / "home")
    home.secrets.mkdir(parents=True, mode=0o700)
    home.app_passfile.write_text(OLD)
    return home


def pending(home: Home, age: float = 0.0) -> None:
    home.pending_passfile.write_text(NEW)
    then = time.time() - age
    os.utime(home.pending_passfile, (then, then))


def server_with(line: str):
    """A probe for a server whose password is the one in `line`."""
    tried = []

    def probe(passfile):
        tried.append(passfile)
        return None if passfile.read_text() == line else "password authentication failed"
    probe.tried = tried
    return probe


def test_nothing_pending_asks_the_server_nothing(home):
    probe = server_with(OLD)
    assert passwords.finish_rotation(home, probe) == "" and probe.tried == []


def test_a_pending_password_the_server_has_becomes_the_passfile(home):
    pending(home)
    assert passwords.finish_rotation(home, server_with(NEW)) == "promoted"
    assert home.app_passfile.read_text() == NEW and not home.pending_passfile.exists()


def test_a_stale_pending_password_the_server_never_took_is_dropped(home):
    pending(home, age=3600)
    assert passwords.finish_rotation(home, server_with(OLD)) == "dropped"
    assert home.app_passfile.read_text() == OLD and not home.pending_passfile.exists()


def test_a_fresh_pending_password_of_another_rotation_is_left_to_it(home):
    pending(home)  # written just now: that rotation may be about to ALTER ROLE
    with pytest.raises(PgJobError, match="under way"):
        passwords.finish_rotation(home, server_with(OLD))
    assert home.pending_passfile.read_text() == NEW


def test_a_rotation_drops_its_own_pending_password_at_once(home):
    pending(home)
    assert passwords.finish_rotation(home, server_with(OLD), ours=True) == "dropped"


def test_when_the_server_accepts_neither_both_files_are_kept(home):
    pending(home, age=3600)
    with pytest.raises(PgJobError, match="accepts neither") as failed:
        passwords.finish_rotation(home, server_with("*:*:*:optuna:other\n"))
    assert "pgjob init" in str(failed.value)
    assert home.pending_passfile.read_text() == NEW and home.app_passfile.read_text() == OLD


def test_the_pending_file_is_created_exclusively_and_follows_no_link(home, tmp_path):
    target = tmp_path / "elsewhere"
    home.pending_passfile.symlink_to(target)
    with pytest.raises(PgJobError, match="under way"):
        passwords._write_pending(home, NEW)
    assert not target.exists()
    home.pending_passfile.unlink()
    passwords._write_pending(home, NEW)
    assert oct(home.pending_passfile.stat().st_mode & 0o777) == "0o600"


def test_pgbouncer_in_front_is_not_asked_which_password_the_server_has(home):
    pooled = Endpoint(host="127.0.0.1", port=6432, database="optuna", user="optuna",
                      passfile=str(home.app_passfile), node="n", job_id="", scheduler="",
                      pid=1, started_at=0.0, generation=1, system_identifier="",
                      pooler="pgbouncer")
    with pytest.raises(PgJobError, match="pgbouncer"):
        passwords.endpoint_probe(home, pooled)
