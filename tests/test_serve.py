"""`pgjob serve`, `url`, `stop`: the server inside a job, found by workers, stopped cleanly."""
import json
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from conftest import Served, run_pgjob
from pgjob import binaries
from pgjob.cluster import cluster_state
from pgjob.home import open_home
from pgjob.waiting import until

pytestmark = pytest.mark.pg


def controldata_state(home_path):
    settings = open_home(home_path).settings()
    return cluster_state(binaries.find(settings.pg_bin), home_path / "data")


def test_psql_connects_with_the_printed_url_and_no_password(server, home_path, tmp_path):
    url = run_pgjob("url", "--home", str(home_path), "--wait", "30", "--format", "libpq",
                    check=True).stdout.strip()
    assert "password" not in url
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["HOME"] = str(tmp_path)  # no ~/.pgpass to help
    done = subprocess.run(["psql", url, "-XAtc", "select current_user, inet_server_addr()"],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "optuna|127.0.0.1"


def test_url_formats(server, home_path):
    sqlalchemy = run_pgjob("url", "--home", str(home_path), check=True).stdout.strip()
    assert sqlalchemy.startswith("postgresql+psycopg://optuna@127.0.0.1:")
    fields = json.loads(run_pgjob("url", "--home", str(home_path), "--format", "json",
                                  check=True).stdout)
    assert fields["host"] == "127.0.0.1" and fields["generation"] >= 1
    env = run_pgjob("url", "--home", str(home_path), "--format", "env", check=True).stdout
    done = subprocess.run(["bash", "-c", env + 'psql -XAtc "select 41 + 1"'],
                          capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "42", done.stderr


def test_url_without_a_server_fails_clearly(home_path):
    done = run_pgjob("url", "--home", str(home_path))
    assert done.returncode == 2 and done.stdout == ""
    assert "no server has been published" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("garbage", ['{"state": "serving", "host": "10.', "", "[1, 2]"])
def test_url_wait_never_prints_a_half_written_endpoint(home_path, garbage):
    (home_path / "endpoint.json").write_text(garbage)
    done = run_pgjob("url", "--home", str(home_path), "--wait", "1.5")
    assert done.returncode == 2 and done.stdout == ""
    assert "after waiting 2 s" in done.stderr or "after waiting 1 s" in done.stderr


def test_url_wait_returns_once_the_server_is_up(home_path, tmp_path):
    waiting = subprocess.Popen(
        [sys.executable, "-m", "pgjob", "url", "--home", str(home_path), "--wait", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert waiting.poll() is None  # nothing published: it waits
    served = Served(home_path, tmp_path / "serve.log")
    out, err = waiting.communicate(timeout=90)
    assert waiting.returncode == 0, err
    assert out.startswith("postgresql+psycopg://")
    served.stop()


def test_stop_leaves_a_cleanly_shut_down_cluster_and_no_postmaster(server, home_path):
    postmaster = server.postmaster()
    done = run_pgjob("stop", "--home", str(home_path), "--wait", "60", check=True)
    assert "stopped" in done.stdout
    assert server.process.wait(30) == 0
    assert not postmaster.is_running()
    assert controldata_state(home_path) == "shut down"
    assert json.loads((home_path / "endpoint.json").read_text())["state"] == "withdrawn"
    assert run_pgjob("url", "--home", str(home_path)).returncode == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_stop_signals_shut_down_cleanly(server, home_path, sig):
    postmaster = server.postmaster()
    assert server.stop(sig) == 0
    assert not postmaster.is_running()
    assert controldata_state(home_path) == "shut down"
    assert f"stopping: {signal.Signals(sig).name}" in server.log.read_text()


def test_a_killed_serve_takes_its_postmaster_with_it(server, home_path):
    postmaster = server.postmaster()
    server.stop(signal.SIGKILL)
    assert until(lambda: not postmaster.is_running(), 30)


def test_url_after_serve_was_killed_outright_says_its_serve_is_gone(server, home_path):
    postmaster = server.postmaster()
    server.stop(signal.SIGKILL)  # no chance to withdraw: the endpoint still says serving
    assert until(lambda: not postmaster.is_running(), 30)
    done = run_pgjob("url", "--home", str(home_path))
    assert done.returncode == 2 and "the serve that published it is gone" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_dead_postmaster_is_restarted_and_republished(server, home_path):
    first = server.endpoint()
    os.kill(first.pid, signal.SIGKILL)
    second = until(lambda: (e := server.endpoint()) and e.generation > first.generation and e,
                   60, interval=0.2)
    assert second and second.pid != first.pid
    with second.connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert "restarting it" in server.log.read_text()


def test_a_taken_port_is_skipped_and_the_real_one_published(home_path, tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        run_pgjob("init", "--home", str(home_path), "--port", str(taken), check=True)
        served = Served(home_path, tmp_path / "serve.log")
        found = served.endpoint()
        assert found.port != taken
        with found.connect() as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        assert f"port {taken} is taken" in served.log.read_text()
        served.stop()


def test_a_second_serve_of_the_same_home_is_refused(server, home_path):
    done = run_pgjob("serve", "--home", str(home_path), "--host", "127.0.0.1", timeout=60)
    assert done.returncode == 7
    assert "already runs this home" in done.stderr and "Traceback" not in done.stderr
    with server.endpoint().connect() as conn:  # the first one is untouched
        assert conn.execute("select 1").fetchone() == (1,)


def test_serve_without_a_home_says_how_to_make_one(tmp_path):
    done = run_pgjob("serve", "--home", str(tmp_path / "nothing"))
    assert done.returncode == 4 and "pgjob init" in done.stderr


def test_the_socket_directory_is_private_and_removed_after(server, home_path):
    conf = (home_path / "data" / "pgjob.conf").read_text()
    sockdir = conf.split("unix_socket_directories = '")[1].split("'")[0]
    assert len(sockdir) < 80 and os.stat(sockdir).st_mode & 0o777 == 0o700
    server.stop()
    assert not os.path.exists(sockdir)


def test_listens_only_on_the_published_address(server, home_path):
    conf = (home_path / "data" / "pgjob.conf").read_text()
    assert "listen_addresses = '127.0.0.1'" in conf
    listening = {c.laddr.ip for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server.endpoint().port}
    assert listening == {"127.0.0.1"}


def test_optuna_study_through_optuna_storage(server, home_path, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, optuna, pgjob\n"
        "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
        "study = optuna.create_study(storage=pgjob.optuna_storage(sys.argv[1], wait=30),\n"
        "                            study_name='s', load_if_exists=True)\n"
        "study.optimize(lambda t: t.suggest_float('x', -1, 1) ** 2, n_trials=10)\n")
    workers = [subprocess.Popen([sys.executable, str(script), str(home_path)])
               for _ in range(3)]
    assert [w.wait(120) for w in workers] == [0, 0, 0]
    with server.endpoint().connect() as conn:
        states = conn.execute("select state::text, count(*) from trials group by 1").fetchall()
    assert states == [("COMPLETE", 30)]


@pytest.mark.parametrize("command", ["url", "status", "stop"])
def test_commands_on_a_missing_home_say_how_to_make_one(tmp_path, command):
    done = run_pgjob(command, "--home", str(tmp_path / "nowhere"))
    assert done.returncode == 4
    assert "no pgjob home" in done.stderr and "pgjob init" in done.stderr


def test_stop_after_serve_was_killed_outright_says_stopped(server, home_path):
    server.stop(signal.SIGKILL)
    done = run_pgjob("stop", "--home", str(home_path), "--wait", "10", timeout=30)
    assert done.returncode == 0 and "stopped" in done.stdout
    assert not (home_path / "run" / "serve.json").exists()
    assert "its serve process died" in run_pgjob("url", "--home", str(home_path)).stderr
