"""pgjob started as root: PostgreSQL refuses root, so pgjob runs it as another account."""
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import pgjob
from conftest import Served, run_pgjob
from pgjob.waiting import until

pytestmark = pytest.mark.root


@pytest.fixture
def reachable_dir():
    """A directory where the postgres account can make its home, like /tmp (pytest's own
    tmp is root-only, and pgjob as root makes no folder for another account)."""
    path = Path(tempfile.mkdtemp(prefix="pgjob-root-", dir="/var/tmp"))
    os.chmod(path, 0o1777)
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


@pytest.fixture
def small_disk():
    """A 200 MB filesystem of its own (tmpfs), so that filling it harms nothing else."""
    path = Path(tempfile.mkdtemp(prefix="pgjob-disk-", dir="/var/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m,mode=1777", "tmpfs", str(path)],
                   check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)


def fill(filler: Path) -> None:
    """Write `filler` until its disk is full to the last block."""
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * (1 << 20))
                out.flush()
        except OSError:
            pass


def test_a_full_disk_is_reported_and_the_study_recovers_when_space_is_freed(small_disk,
                                                                           tmp_path):
    import optuna

    home = small_disk / "home"
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", check=True)
    served = Served(home, tmp_path / "serve.log", env={"PGJOB_LEASE_TTL": "10"})
    served.endpoint()
    # the first pgjob worker makes the tables (pgjob's own too) while there is still space
    optuna.create_study(storage=pgjob.optuna_storage(str(home), wait=30), study_name="full")
    filler = small_disk / "filler"
    fill(filler)
    # each trial carries 10 kB that do not compress, so the study soon needs space the disk no longer has
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import optuna, pgjob, secrets, sys\n"
         "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
         "s = optuna.load_study(study_name='full', storage=pgjob.optuna_storage(sys.argv[1]))\n"
         "def f(t):\n"
         "    t.set_user_attr('blob', secrets.token_hex(5000))  # does not compress\n"
         "    return t.suggest_float('x', 0, 1)\n"
         "s.optimize(f, n_trials=1500)\n", str(home)],
        stderr=open(tmp_path / "worker.err", "w"))  # not on the full disk
    worker_err = tmp_path / "worker.err"
    assert until(lambda: "is full" in served.log.read_text(), 120), served.log.read_text()
    # the worker meets the full disk and waits (its storage retries), rather than crashing
    assert until(lambda: "waiting for it to come back" in worker_err.read_text(), 120)
    status = run_pgjob("status", "--home", str(home))
    assert status.returncode in (1, 2), status.stdout  # degraded, or down if it crashed
    assert worker.poll() is None  # waiting for the server, not crashed
    time.sleep(12)  # full for longer than the lease's ttl: renewing it needs no new block
    assert served.process.poll() is None, served.log.read_text()
    filler.unlink()
    assert worker.wait(300) == 0, worker_err.read_text()
    trials = optuna.load_study(study_name="full",
                               storage=served.endpoint(120).sqlalchemy_url()).trials
    assert len(trials) == 1500
    assert run_pgjob("status", "--home", str(home)).returncode == 0
    served.stop()


OTHER = "pgjobother"  # another user of the same cluster


def as_user(user: str, *argv: str, netns: str = "",
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a command as `user` (with a clean environment), in a node's network if given."""
    prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    return subprocess.run([*prefix, "runuser", "-u", user, "--", "env", "-i",
                           "PATH=/usr/bin:/bin", "HOME=/nonexistent", *argv],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def attacks(home: Path, host: str, port: int, netns: str = "") -> None:
    """What another user tries, and must fail at."""
    if subprocess.run(["id", OTHER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", OTHER], check=True)
    for secret in ("secrets/app.pgpass", "secrets/superuser.pgpass", "secrets/ca.key",
                   "endpoint.json", "pgjob.toml"):
        done = as_user(OTHER, "cat", str(home / secret), netns=netns)
        assert done.returncode != 0 and "Permission denied" in done.stderr, secret
    base = f"host={host} port={port} dbname=optuna user=optuna connect_timeout=10"
    tries = {
        "no password": (f"{base} sslmode=require", "no password supplied"),
        "a wrong password": (f"{base} sslmode=require password=guess", "password authentication failed"),
        "no TLS": (f"{base} sslmode=disable password=guess", "no encryption"),
        "the superuser": (f"host={host} port={port} dbname=postgres user=postgres "
                          "sslmode=require password=guess", "pg_hba.conf rejects"),
    }
    for what, (conninfo, refusal) in tries.items():
        done = as_user(OTHER, "psql", "-w", conninfo, "-c", "select 1", netns=netns)
        assert done.returncode != 0 and refusal in done.stderr, (what, done.stderr)


def test_another_user_on_this_machine_gets_nothing(reachable_dir):
    home = reachable_dir / "home"
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", check=True)
    served = Served(home, reachable_dir / "serve.log")
    found = served.endpoint()
    attacks(home, found.host, found.port)
    served.stop()


def test_another_user_on_another_node_gets_nothing_while_the_owner_gets_in(cluster):
    owner = cluster["TEST_USER"]
    work = Path(tempfile.mkdtemp(prefix="pgjob-sec-", dir="/var/tmp"))
    shutil.chown(work, owner)
    home = work / "home"
    pgjob = str(Path(sys.executable).parent / "pgjob")
    job = None
    try:
        assert as_user(owner, pgjob, "init", "--home", str(home)).returncode == 0
        job = as_user(owner, "sbatch", "--parsable", "-w", "node1", "--mem=1G",
                      f"--output={work}/serve-%j.out", f"--export=ALL,PGJOB={pgjob},PGJOB_RENEW=0",
                      f"--chdir={work}", str(Path(__file__).parent.parent / "jobscripts" /
                                             "pgjob-serve.sh"), str(home))
        assert job.returncode == 0, job.stderr
        url = as_user(owner, pgjob, "url", "--home", str(home), "--wait", "90",
                      "--format", "libpq", timeout=120)
        log = work / f"serve-{job.stdout.strip()}.out"
        assert url.returncode == 0, url.stderr + (log.read_text() if log.exists() else "")
        attacks(home, cluster["NODE1_ADDR"], int(url.stdout.split(":")[2].split("/")[0]),
                netns="node2")
        mine = as_user(owner, "psql", "-w", url.stdout.strip(), "-Atc",
                       "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
                       netns="node3")
        assert mine.returncode == 0 and mine.stdout.strip() == "t", mine.stderr
    finally:
        if job is not None and job.returncode == 0:
            job_id = job.stdout.strip()
            subprocess.run(["scancel", job_id], timeout=30)
            until(lambda: not subprocess.run(["squeue", "-h", "-j", job_id],
                                             capture_output=True, text=True).stdout.strip(), 60)
        shutil.rmtree(work, ignore_errors=True)


PLANT = """
import os, sys, time
shared, kind = sys.argv[1], sys.argv[2]
loot = os.path.join(shared, "loot")
os.makedirs(loot, exist_ok=True)
os.chmod(loot, 0o777)
target = os.path.join(loot, "got-it")
os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o666))
os.chmod(target, 0o666)
start = time.time() - 1
for ms in range(40000):  # every name pgjob used to give a dump in the next 39 s
    now = start + ms / 1000
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + f"-{int(now % 1 * 1000):03d}"
    if kind == "partial":
        os.symlink(target, os.path.join(shared, f".optuna-{stamp}.dump.partial"))
    else:
        try:
            os.close(os.open(os.path.join(shared, f"optuna-{stamp}.dump"),
                             os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # the backup made before
            pass
"""
OWNER = "pgjobtest"  # the unprivileged account whose home is backed up


def ensure_other() -> None:
    if subprocess.run(["id", OTHER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-M", "-s", "/bin/sh", OTHER], check=True)


def pgjob_as(user: str, *args: str) -> subprocess.CompletedProcess:
    """The pgjob these tests import, run as `user`."""
    source = str(Path(pgjob.__file__).resolve().parent.parent)
    return as_user(user, f"PYTHONPATH={source}", "PYTHONDONTWRITEBYTECODE=1",
                   sys.executable, "-m", "pgjob", *args)


def test_names_another_user_plants_in_a_shared_folder_get_no_backup(reachable_dir):
    ensure_other()
    home = reachable_dir / "home"
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", "--run-as", OWNER,
              check=True)
    served = Served(home, reachable_dir / "serve.log")
    served.endpoint()
    shared = reachable_dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    owner, other = pwd.getpwnam(OWNER).pw_uid, pwd.getpwnam(OTHER).pw_uid

    # the old predictable temporary names, as links to a file the other user can read
    planted = as_user(OTHER, sys.executable, "-c", PLANT, str(shared), "partial")
    assert planted.returncode == 0, planted.stderr
    done = pgjob_as(OWNER, "backup", "--home", str(home), "--out", str(shared))
    assert done.returncode == 0, done.stderr
    made = Path(done.stdout.split("backup written: ", 1)[1].strip())
    info = made.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == owner
    assert as_user(OTHER, "cat", str(made)).returncode != 0
    assert (shared / "loot" / "got-it").stat().st_size == 0

    # the final names taken: no backup, said in one line, and still nothing for the other
    planted = as_user(OTHER, sys.executable, "-c", PLANT, str(shared), "final")
    assert planted.returncode == 0, planted.stderr
    done = pgjob_as(OWNER, "backup", "--home", str(home), "--out", str(shared))
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert "could not write a backup" in done.stderr.strip().splitlines()[0]
    for path in shared.rglob("*"):
        info = path.lstat()
        if info.st_uid == other:
            assert not stat.S_ISREG(info.st_mode) or info.st_size == 0, path
        else:
            assert path == made, path  # the first backup, and no half-written one
    served.stop()


def test_a_full_disk_fails_backup_and_rotation_clearly_and_the_password_still_works(
        small_disk, tmp_path):
    import optuna

    home = small_disk / "home"
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", check=True)
    served = Served(home, tmp_path / "serve.log")
    served.endpoint()
    old = (home / "secrets" / "app.pgpass").read_text()
    # a study worth backing up: its dump cannot fit in the last few free blocks
    study = optuna.create_study(storage=pgjob.optuna_storage(str(home), wait=30))
    study.optimize(lambda t: t.set_user_attr("blob", secrets.token_hex(5000)) or 0.0,
                   n_trials=20)
    filler = small_disk / "filler"
    fill(filler)
    done = run_pgjob("backup", "--home", str(home))
    assert done.returncode in (3, 6) and "Traceback" not in done.stderr, done.stderr
    assert list((home / "backups").iterdir()) == []  # nothing half-written kept
    done = run_pgjob("rotate-password", "--home", str(home))
    assert done.returncode == 3 and "Traceback" not in done.stderr, done.stderr
    assert "could not write the new password" in done.stderr
    assert (home / "secrets" / "app.pgpass").read_text() == old
    assert run_pgjob("url", "--home", str(home)).returncode == 0  # the old password works
    filler.unlink()
    run_pgjob("rotate-password", "--home", str(home), check=True)
    assert run_pgjob("url", "--home", str(home)).returncode == 0
    served.stop()
