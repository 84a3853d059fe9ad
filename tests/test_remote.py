"""`pgjob psql` and `pgjob dashboard` against a real server on loopback, and the tunnel's
free_port, which binds loopback sockets (its end-to-end tests, which need root for network
namespaces, are in test_tunnel.py; its pure parts in unit/test_tunnel.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request

import optuna
import pexpect
import pytest

from conftest import pgjob_cmd, run_pgjob
from pgjob.tunnel import free_port
from pgjob.waiting import until

@pytest.mark.pg
def test_psql_opens_a_session_on_the_study_database_with_no_password_typed(server):
    optuna.create_study(storage=server.endpoint().sqlalchemy_url(), study_name="seen-by-psql")
    cmd = pgjob_cmd("psql", "--home", str(server.home_path))
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=30,
                          env={**os.environ, "PAGER": "cat", "PSQLRC": "/dev/null"})
    try:
        child.expect(r"optuna=> ")
        child.sendline("select count(*) as studies from studies;")
        child.expect(r"studies\s*\r\n-+\r\n\s*1\r\n")
        child.sendline(r"\conninfo")
        child.expect("SSL connection")
        child.sendline(r"\q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Password" not in child.before


@pytest.mark.pg
def test_psql_passes_its_arguments_on(server):
    done = run_pgjob("psql", "--home", str(server.home_path), "--", "-Atc", "select current_user")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "optuna"


@pytest.mark.pg
def test_psql_without_a_server_says_so(home_path):
    done = run_pgjob("psql", "--home", str(home_path))
    assert done.returncode == 2 and "nothing is served" in done.stderr


@pytest.mark.pg
def test_the_dashboard_serves_the_studies_and_stops(server, tmp_path):
    optuna.create_study(storage=server.endpoint().sqlalchemy_url(), study_name="on-the-board")
    port = free_port()
    with open(tmp_path / "dashboard.log", "w") as log:
        board = subprocess.Popen(pgjob_cmd("dashboard", "--home", str(server.home_path),
                                           "--port", str(port)), stdout=log, stderr=log,
                                 env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        def studies():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies",
                                            timeout=5) as answer:
                    return json.load(answer)["study_summaries"]
            except OSError:
                return None

        listed = until(studies, 60, interval=0.3)
        assert listed, (tmp_path / "dashboard.log").read_text()
        assert [s["study_name"] for s in listed] == ["on-the-board"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        board.send_signal(signal.SIGTERM)
        try:
            assert board.wait(30) == 0, (tmp_path / "dashboard.log").read_text()
        except subprocess.TimeoutExpired:
            board.send_signal(signal.SIGABRT)  # faulthandler: where it hung, into the log
            board.wait(10)
            raise AssertionError("the dashboard did not stop on SIGTERM:\n"
                                 + (tmp_path / "dashboard.log").read_text()) from None


@pytest.mark.pg
def test_a_missing_dashboard_names_the_extra_to_install(home_path, tmp_path):
    hidden = tmp_path / "hide"
    hidden.mkdir()
    (hidden / "optuna_dashboard.py").write_text("raise ImportError('not installed')\n")
    done = run_pgjob("dashboard", "--home", str(home_path),
                     env={"PYTHONPATH": os.pathsep.join(
                         [str(hidden), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 3
    assert 'pip install "pgjob[dashboard]"' in done.stderr and "Traceback" not in done.stderr


def test_free_ports_differ_and_are_free():
    import socket

    first, second = free_port(), free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first))  # free: binding it works
    assert first != second or free_port() != first
