"""pgjob started as root becomes the home's account before it touches the home.

The account (here postgres, as `--run-as` or the default) can change everything inside
the home; whatever it plants there must not make root act on a path outside it.
"""
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest

from conftest import Served, run_pgjob
from test_root import as_user

pytestmark = pytest.mark.root

ACCOUNT = "postgres"


@pytest.fixture
def work():
    path = Path(tempfile.mkdtemp(prefix="pgjob-priv-", dir="/var/tmp"))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def victim():
    """A folder and a file of root's, which the account must never be able to touch."""
    path = Path(tempfile.mkdtemp(prefix="pgjob-victim-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    secret = path / "root-only"
    secret.write_text("root's own\n")
    os.chmod(secret, 0o600)
    yield path, secret
    shutil.rmtree(path, ignore_errors=True)


def users(processes) -> set[str]:
    """Who runs these processes (a backend may end while we look: skip it)."""
    seen = set()
    for process in processes:
        try:
            seen.add(process.username())
        except psutil.NoSuchProcess:
            pass
    return seen


def untouched(path: Path, mode: int, text: str | None = None) -> bool:
    st = os.lstat(path)
    same = st.st_uid == 0 and stat.S_IMODE(st.st_mode) == mode
    return same and (text is None or path.read_text() == text)


def test_serve_started_as_root_runs_entirely_as_the_account(work):
    home = work / "home"
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", check=True)
    served = Served(home, work / "serve.log")
    try:
        served.endpoint()
        serve = psutil.Process(served.process.pid)
        assert serve.username() == ACCOUNT and set(serve.uids()) == {serve.uids().real}
        assert users(serve.children(recursive=True)) == {ACCOUNT}
    finally:
        assert served.stop() == 0


def test_a_link_the_account_plants_for_a_folder_does_not_make_root_chown_it(work, victim):
    folder, secret = victim
    home = work / "home"
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", check=True)
    # the account swaps its logs folder for a link to a folder of root's
    assert as_user(ACCOUNT, "sh", "-c", f"rm -rf {home}/logs && ln -s {folder} {home}/logs"
                   ).returncode == 0
    done = run_pgjob("init", "--home", str(home))
    assert done.returncode == 4, done.stderr
    assert "is not a folder" in done.stderr and "Traceback" not in done.stderr
    assert untouched(folder, 0o755) and untouched(secret, 0o600, "root's own\n")


def test_a_link_the_account_plants_for_the_server_log_does_not_reach_roots_file(work, victim):
    _, secret = victim
    home = work / "home"
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", check=True)
    assert as_user(ACCOUNT, "ln", "-sf", str(secret), f"{home}/logs/postgresql.log"
                   ).returncode == 0
    done = run_pgjob("serve", "--home", str(home), "--host", "127.0.0.1", timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert "cannot write its log" in done.stderr
    assert untouched(secret, 0o600, "root's own\n")


def test_root_makes_no_folder_for_the_account(victim):
    folder, _ = victim  # root's, 0755: the account cannot create anything in it
    done = run_pgjob("init", "--home", str(folder / "home"))
    assert done.returncode == 4 and "install -d -o postgres" in done.stderr, done.stderr
    assert not (folder / "home").exists()


def test_an_existing_home_runs_as_its_owner_whatever_its_settings_say(work):
    home = work / "home"
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", check=True)
    if subprocess.run(["id", "pgjobother"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", "pgjobother"], check=True)
    # the owner names another account in its settings: root must not act as that one
    settings = home / "pgjob.toml"
    settings.write_text(settings.read_text().replace('run_as = ""', 'run_as = "pgjobother"'))
    run_pgjob("init", "--home", str(home), check=True)
    owners = {p.owner() for p in [home, *home.rglob("*")] if not p.is_symlink()}
    assert owners == {ACCOUNT}
    done = run_pgjob("serve", "--home", str(home), "--run-as", "pgjobother")
    assert done.returncode == 4 and "belongs to postgres" in done.stderr, done.stderr
