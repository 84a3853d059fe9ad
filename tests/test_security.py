"""Secure by default: TLS the client verifies, no plain text, private secrets, rotation."""
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from conftest import run_pgjob, trial_states
from pgjob import endpoint
from pgjob.home import open_home
from pgjob.initialize import init
from pgjob.waiting import until

pytestmark = pytest.mark.pg


def test_plain_text_connections_are_refused(server):
    found = server.endpoint()
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(host=found.host, port=found.port, user=found.user,
                        dbname=found.database, passfile=found.passfile, sslmode="disable")


def test_the_printed_url_verifies_the_server_over_tls(server, home_path):
    url = run_pgjob("url", "--home", str(home_path), "--format", "libpq", check=True).stdout
    assert "sslmode=verify-full" in url and "sslrootcert=" in url
    with psycopg.connect(url.strip()) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()"
                            ).fetchone() == (True,)


def test_a_forged_server_at_the_published_address_is_rejected(home_path, tmp_path):
    # Another instance, with its own CA, answers where ours is published (say, on the
    # address our server had): a client following our endpoint refuses it during the TLS
    # handshake, before any password is sent.
    impostor = tmp_path / "impostor"
    init(impostor, allow=("127.0.0.0/8",))
    forged = subprocess.Popen([sys.executable, "-m", "pgjob", "serve", "--home",
                               str(impostor), "--host", "127.0.0.2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        theirs = endpoint.wait_connectable(open_home(impostor), 60)
        ours = open_home(home_path)
        ours.write(ours.endpoint_file, theirs.to_json())
        done = run_pgjob("url", "--home", str(home_path))
        assert done.returncode == 2 and "certificate verify failed" in done.stderr
    finally:
        forged.terminate()
        forged.wait(30)


def test_tls_files_are_private(server, home_path):
    for path in (home_path / "secrets" / "ca.key", home_path / "secrets" / "ca.crt",
                 home_path / "data" / "server.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_status_warns_about_loose_modes_and_init_repairs_them(server, home_path):
    os.chmod(home_path / "secrets" / "ca.key", 0o644)
    os.chmod(home_path, 0o755)
    done = run_pgjob("status", "--home", str(home_path))
    assert done.returncode == 1, done.stdout
    assert "ca.key is open to other users (mode 0644)" in done.stdout
    assert "(mode 0755)" in done.stdout
    # a passfile others can read is one libpq itself refuses to use: down, and why
    os.chmod(home_path / "secrets" / "app.pgpass", 0o640)
    done = run_pgjob("status", "--home", str(home_path))
    assert done.returncode == 2 and "app.pgpass is open to other users" in done.stdout
    run_pgjob("init", "--home", str(home_path), check=True)
    assert run_pgjob("status", "--home", str(home_path)).returncode == 0


@pytest.mark.parametrize("what", ["secrets", "endpoint.json", "secrets/ca.crt"])
def test_a_home_others_can_change_is_refused_until_the_owner_closes_it(server, home_path, what):
    path = home_path / what
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) | stat.S_IWGRP)
    for command in ("url", "status", "stop"):
        done = run_pgjob(command, "--home", str(home_path))
        assert done.returncode == 4, (command, done.stdout, done.stderr)
        assert f"{path} can be changed by other users" in done.stderr
        assert "chmod go-w" in done.stderr and "Traceback" not in done.stderr
    assert server.process.poll() is None  # the refused `pgjob stop` stopped nothing
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) & ~stat.S_IWGRP)
    assert run_pgjob("url", "--home", str(home_path)).returncode == 0


def test_a_link_in_place_of_a_secret_is_refused(server, home_path, tmp_path):
    passfile = home_path / "secrets" / "app.pgpass"
    kept = tmp_path / "app.pgpass"
    os.replace(passfile, kept)
    passfile.symlink_to(kept)
    done = run_pgjob("url", "--home", str(home_path))
    assert done.returncode == 4 and f"{passfile} is a symbolic link" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_password_is_nowhere_but_the_passfile(server, home_path, tmp_path):
    password = (home_path / "secrets" / "app.pgpass").read_text().strip().split(":")[-1]
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, optuna, pgjob\n"
         "s = optuna.create_study(storage=pgjob.optuna_storage(sys.argv[1]), study_name='p')\n"
         "s.optimize(lambda t: time.sleep(0.2) or t.suggest_float('x', 0, 1), n_trials=40)\n",
         str(home_path)], stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    seen = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for what in ("cmdline", "environ"):
            try:
                if password.encode() in Path(f"/proc/{pid}/{what}").read_bytes():
                    seen.append((pid, what))
            except OSError:
                pass
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    assert seen == []
    logs = [*(home_path / "logs").iterdir(), server.log]
    assert not any(password in p.read_text(errors="replace") for p in logs)
    assert password not in err
    assert password not in run_pgjob("status", "--home", str(home_path), "--json").stdout


def test_rotation_keeps_a_running_study_going(server, home_path):
    passfile = home_path / "secrets" / "app.pgpass"
    old = passfile.read_text()
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, optuna, pgjob\n"
         "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
         "s = optuna.create_study(storage=pgjob.optuna_storage(sys.argv[1]), study_name='r')\n"
         "s.optimize(lambda t: time.sleep(0.1) or t.suggest_float('x', 0, 1), n_trials=60)\n",
         str(home_path)], stderr=subprocess.PIPE, text=True)
    found = server.endpoint()
    assert until(lambda: sum(trial_states(found, "r").values()) >= 10, 60)
    done = run_pgjob("rotate-password", "--home", str(home_path), check=True)
    assert "password was changed" in done.stdout
    assert passfile.read_text() != old and stat.S_IMODE(passfile.stat().st_mode) == 0o600
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    with server.endpoint().connect() as conn:
        assert conn.execute("select count(*) from trials where state = 'COMPLETE'"
                            ).fetchone() == (60,)
    stale = home_path / "old.pgpass"
    stale.write_text(old)
    stale.chmod(0o600)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=found.host, port=found.port, user=found.user,
                        dbname=found.database, passfile=str(stale), sslmode="verify-full",
                        sslrootcert=found.sslrootcert)
