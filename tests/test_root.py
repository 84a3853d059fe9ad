"""pgjob started as root: PostgreSQL refuses root, so pgjob runs it as another account."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import Served, run_pgjob

pytestmark = pytest.mark.root


@pytest.fixture
def reachable_dir():
    """A directory the postgres account can reach (pytest's own tmp is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="pgjob-root-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_root_serves_as_the_postgres_account(reachable_dir):
    home = reachable_dir / "home"
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", check=True)
    owner = home.stat().st_uid
    assert owner != 0 and (home / "secrets" / "app.pgpass").stat().st_uid == owner
    served = Served(home, reachable_dir / "serve.log")
    try:
        assert served.postmaster().username() == "postgres"
        with served.endpoint().connect() as conn:
            assert conn.execute("select current_user").fetchone() == ("optuna",)
        assert (home / "endpoint.json").stat().st_uid == owner
    finally:
        assert served.stop() == 0


def test_a_missing_run_as_account_says_what_to_do(reachable_dir):
    done = run_pgjob("init", "--home", str(reachable_dir / "h"), "--run-as", "nosuchuser")
    assert done.returncode == 4
    assert "useradd" in done.stderr and "Traceback" not in done.stderr


def test_run_as_root_is_refused(reachable_dir):
    done = run_pgjob("init", "--home", str(reachable_dir / "h"), "--run-as", "root")
    assert done.returncode == 4 and "refuses to run as root" in done.stderr


def test_a_home_the_account_cannot_reach_is_refused_before_initdb(tmp_path):
    os.chmod(tmp_path, 0o700)
    done = run_pgjob("init", "--home", str(tmp_path / "home"))
    assert done.returncode == 4
    assert "cannot enter" in done.stderr and "Traceback" not in done.stderr
