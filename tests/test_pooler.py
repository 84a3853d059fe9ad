"""pgbouncer in front of the server (pooler = "pgbouncer"): workers reach PostgreSQL only
through it, over TLS, and it is kept alive, given rotated passwords, and stopped with serve."""
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import optuna
import psutil
import psycopg
import pytest

import pgjob
from conftest import Served, run_pgjob, skip_unless_ci
from pgjob import pooler
from pgjob.waiting import until

pytestmark = pytest.mark.pg
POOLED = {"PGJOB_POOLER": "pgbouncer"}


@pytest.fixture
def pooled(home_path, tmp_path):
    if pooler.find() is None:
        skip_unless_ci("pgbouncer is not installed (`./dev test` as root installs it)")
    served = Served(home_path, tmp_path / "serve.log", env=POOLED)
    served.endpoint()
    return served


def _bouncer(served) -> psutil.Process:
    found = [p for p in psutil.Process(served.process.pid).children() if p.name() == "pgbouncer"]
    assert len(found) == 1, found
    return found[0]


def _study_runs(home, name: str, trials: int = 20) -> int:
    study = optuna.create_study(storage=pgjob.optuna_storage(home, wait=60), study_name=name,
                                load_if_exists=True, sampler=optuna.samplers.RandomSampler())
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=trials, n_jobs=2)
    return len(study.trials)


def test_workers_go_through_pgbouncer_over_tls_only(pooled):
    found = pooled.endpoint()
    assert found.pooler == "pgbouncer"
    assert _bouncer(pooled).pid != found.pid
    with found.connect() as conn:  # through pgbouncer, which reaches PostgreSQL's socket
        assert conn.execute("show listen_addresses").fetchone()[0] == ""
    assert _study_runs(pooled.home_path, "pooled") == 20
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host=found.host, port=found.port, user=found.user,
                        dbname=found.database, passfile=found.passfile, sslmode="disable",
                        connect_timeout=5).close()
    assert "through pgbouncer" in pooled.log.read_text()


def test_a_dead_pgbouncer_is_restarted_and_stops_with_serve(pooled):
    first = _bouncer(pooled)
    first.kill()
    assert until(lambda: len([p for p in psutil.Process(pooled.process.pid).children()
                              if p.name() == "pgbouncer" and p.pid != first.pid]) == 1, 30)
    assert _study_runs(pooled.home_path, "after-restart", trials=5) == 5
    second = _bouncer(pooled)
    assert "pgbouncer exited" in pooled.log.read_text()
    assert pooled.stop() == 0
    assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE


def _password(home: Path) -> bytes:
    return (home / "secrets" / "app.pgpass").read_bytes().strip().split(b":", 4)[4]


def _connect_with(found, password: bytes) -> psycopg.Connection:
    return psycopg.connect(host=found.host, port=found.port, user=found.user,
                           dbname=found.database, password=password.decode(),
                           sslmode="verify-full", sslrootcert=found.sslrootcert,
                           connect_timeout=5, autocommit=True)


def test_rotated_password_reaches_pgbouncer(pooled):
    old = _password(pooled.home_path)
    done = run_pgjob("rotate-password", "--home", str(pooled.home_path))
    assert done.returncode == 0, done.stderr
    assert until(lambda: "reloaded with the rotated password" in pooled.log.read_text(), 30)
    fresh = pooled.endpoint()
    with fresh.connect() as conn:
        # Close every server connection pgbouncer holds, so that the next ones are opened
        # now, with the keys of a client that logged in with the new password.
        cut = conn.execute("select now()").fetchone()[0]
        conn.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                     "where usename = current_user and pid <> pg_backend_pid()")
        with pytest.raises(psycopg.errors.AdminShutdown):
            conn.execute("select pg_terminate_backend(pg_backend_pid())")
    assert _study_runs(pooled.home_path, "after-rotation", trials=10) == 10
    with fresh.connect() as conn:
        assert conn.execute("select backend_start from pg_stat_activity "
                            "where pid = pg_backend_pid()").fetchone()[0] > cut
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        _connect_with(fresh, old).close()


def _files_of_mine(top: Path, skip: set[Path]):
    """Regular files owned by this test's user under `top`, links not followed."""
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if Path(root, d) not in skip]
        for name in files:
            path = Path(root, name)
            try:
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                    yield path
            except OSError:
                continue


def _holding(password: bytes, tops: set[Path], skip: set[Path]) -> list[Path]:
    found = []
    for top in tops:
        for path in _files_of_mine(top, skip):
            try:
                if password in path.read_bytes():
                    found.append(path)
            except OSError:
                continue
    return found


def test_a_killed_serve_leaves_no_password_on_the_node(pooled, template_home, tmp_path,
                                                       tmp_path_factory):
    home, password = pooled.home_path, _password(pooled.home_path)
    assert _study_runs(home, "before-kill", trials=5) == 5  # a worker, through pgbouncer
    bouncer = _bouncer(pooled)
    workdir = Path(bouncer.cmdline()[1]).parent  # serve's private dir: pgbouncer.ini's
    postmaster = pooled.postmaster()
    pooled.stop(signal.SIGKILL)  # no clean-up of any kind
    assert until(lambda: not bouncer.is_running() and not postmaster.is_running(), 60)
    assert (workdir / "userlist.txt").is_file()  # what the dead serve left behind
    # The node's temp dirs (the test harness's own tree aside), and the home outside secrets/
    tops = {Path(d) for d in (os.environ.get("TMPDIR"), tempfile.gettempdir(), "/tmp",
                              "/var/tmp", "/dev/shm") if d and os.path.isdir(d)}
    skip = {tmp_path_factory.getbasetemp(), home / "secrets"}
    assert _holding(password, tops | {home}, skip) == []
    # The next serve on this node clears what the dead one left; a serve of another home
    # starting beside it leaves the live one's directory alone.
    again = Served(home, tmp_path / "again.log", env=POOLED)
    again.endpoint()
    assert not workdir.exists()
    assert "left on this node by a serve that is gone" in again.log.read_text()
    again_dir = Path(_bouncer(again).cmdline()[1]).parent
    other = tmp_path / "other"
    shutil.copytree(template_home, other, symlinks=True)
    beside = Served(other, tmp_path / "other.log", env=POOLED)
    beside.endpoint()
    assert again_dir.is_dir()
    assert _study_runs(home, "after-kill", trials=5) == 5
    with again.endpoint().connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)
