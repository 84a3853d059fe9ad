"""`pgjob demo`, the README's first command, as the user runs it."""
import glob

import pytest

from conftest import run_pgjob


def _demo():
    before = set(glob.glob("/tmp/pgjob-demo-*"))
    done = run_pgjob("demo", "--workers", "2", "--trials", "8", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo finished: OK" in done.stdout
    assert "study pgjob-demo: 8 complete" in done.stdout
    assert "pg_controldata says: shut down" in done.stdout
    assert set(glob.glob("/tmp/pgjob-demo-*")) == before  # cleaned up after itself
    return done


@pytest.mark.pg
def test_demo_as_a_normal_user():
    assert "running as" not in _demo().stdout


@pytest.mark.root
def test_demo_as_root_runs_postgresql_as_an_unprivileged_account():
    assert "running as postgres (pgjob runs as root)" in _demo().stdout
