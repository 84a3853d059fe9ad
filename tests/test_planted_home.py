"""A home that another user put where ours should be is refused, never trusted.

In a folder both can write (a group project folder without the sticky bit), another user
can put a home of theirs at the path we use: its endpoint and CA would send our workers,
verify-full and all, to their server. Clients check whose the home is before reading it.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pgjob.waiting import until
from test_root import OTHER, as_user

pytestmark = pytest.mark.root
VICTIM = "pgjobtest"
REPO = str(Path(__file__).parent.parent)
TRUST_ANYONE = "hostssl all all 127.0.0.1/32 trust  # the attacker's: anybody gets in\n"
# What a victim's worker does; a refusal is printed as pgjob's CLI would, with its code.
WORKER = """
import sys, optuna, pgjob
try:
    storage = pgjob.optuna_storage(sys.argv[1], wait=10)
except pgjob.PgJobError as exc:
    print(f"pgjob: error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
optuna.create_study(storage=storage, study_name="victims-study")
"""
# What a running worker's storage does when it reconnects: read the endpoint again.
RECONNECT = """
import sys
from pathlib import Path
from pgjob import PgJobError, endpoint
from pgjob.home import Home
try:
    print(endpoint.read(Home(Path(sys.argv[1]))))
except PgJobError as exc:
    print(f"pgjob: error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


def _ensure_user(name: str) -> None:
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", name], check=True)


def python_as(user: str, *argv: str) -> subprocess.CompletedProcess:
    return as_user(user, f"PYTHONPATH={REPO}", "PYTHONDONTWRITEBYTECODE=1", "TMPDIR=/tmp",
                   sys.executable, *argv)


def pgjob_as(user: str, *args: str) -> subprocess.CompletedProcess:
    return python_as(user, "-m", "pgjob", *args)


@pytest.fixture
def shared():
    """A folder both accounts can write, without the sticky bit."""
    for name in (VICTIM, OTHER):
        _ensure_user(name)
    path = Path(tempfile.mkdtemp(prefix="pgjob-shared-", dir="/var/tmp"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _plant(home: Path) -> None:
    """The attacker's home, served, readable by the victim, letting anybody in."""
    done = pgjob_as(OTHER, "init", "--home", str(home), "--allow", "127.0.0.1/32")
    assert done.returncode == 0, done.stderr
    hba = home / "data" / "pg_hba.conf"
    hba.write_text(TRUST_ANYONE + hba.read_text())  # lines above pgjob's block win
    for path in (home, home / "secrets", home / "run"):
        os.chmod(path, 0o755)
    for path in (home / "pgjob.toml", home / "secrets" / "ca.crt"):
        os.chmod(path, 0o644)


@pytest.fixture
def planted(shared):
    home = shared / "home"  # the path the victim uses
    _plant(home)
    serve = subprocess.Popen(
        ["runuser", "-u", OTHER, "--", "env", "-i", "PATH=/usr/bin:/bin", "HOME=/nonexistent",
         f"PYTHONPATH={REPO}", "PYTHONDONTWRITEBYTECODE=1", "TMPDIR=/tmp", sys.executable,
         "-m", "pgjob", "serve", "--home", str(home), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert until(lambda: pgjob_as(OTHER, "url", "--home", str(home)).returncode == 0
                     or serve.poll() is not None, 120), "the attacker's serve did not start"
        assert serve.poll() is None, serve.stderr.read()
        os.chmod(home / "endpoint.json", 0o644)
        yield home
    finally:
        pgjob_as(OTHER, "stop", "--home", str(home), "--wait", "60")
        serve.wait(60)


def _refused(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 4, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_a_home_planted_by_another_user_is_refused(planted):
    # (The attacker's server really takes the victim's connections: it lets anybody in.)
    ours = pgjob_as(OTHER, "url", "--home", str(planted), "--format", "libpq")
    assert ours.returncode == 0, ours.stderr
    not_yours = ("this home is not yours", f"belongs to {OTHER}", "choose your own --home")
    _refused(pgjob_as(VICTIM, "url", "--home", str(planted)), *not_yours)
    _refused(pgjob_as(VICTIM, "status", "--home", str(planted)), *not_yours)
    _refused(python_as(VICTIM, "-c", WORKER, str(planted)), *not_yours)
    _refused(python_as(VICTIM, "-c", RECONNECT, str(planted)), *not_yours)


def test_init_refuses_a_folder_or_a_home_another_user_put_there(shared, planted):
    _refused(pgjob_as(VICTIM, "init", "--home", str(planted)), "this home is not yours")
    empty = shared / "new-home"
    assert as_user(OTHER, "mkdir", "-m", "777", str(empty)).returncode == 0
    _refused(pgjob_as(VICTIM, "init", "--home", str(empty)), "this home is not yours")
    assert list(empty.iterdir()) == []  # nothing of the victim's went into it
