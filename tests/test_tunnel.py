"""`pgjob tunnel` through a real sshd to a server this machine cannot reach directly.

The network, made here (root only, for the namespaces), stands for a laptop, a login node
and a compute node:

    this machine (the laptop)  10.77.214.1
         |
    10.77.214.2  pgjt-gw (sshd, the login node)  10.77.214.5
                                                      |
                                       10.77.214.6  pgjt-node (pgjob serve)

The gateway does not route, so the server is reachable only from the gateway's side.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import optuna
import pexpect
import psycopg
import pytest

from conftest import pgjob_cmd, run_pgjob
from pgjob import endpoint
from pgjob.home import open_home
from pgjob.tunnel import free_port
from pgjob.waiting import until

pytestmark = pytest.mark.root

GW, NODE = "pgjt-gw", "pgjt-node"
GW_ADDR, NODE_ADDR = "10.77.214.2", "10.77.214.6"
SSH_USER = "pgjtssh"
URL = re.compile(r"postgresql\+psycopg://\S+")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)


def in_netns(name: str, *argv: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{name}", *argv]


def remove_network() -> None:
    for name in (GW, NODE):
        sh("ip", "netns", "del", name, check=False)
    sh("ip", "route", "del", "unreachable", "10.77.214.4/30", check=False)


@pytest.fixture(scope="module")
def network():
    if not shutil.which("sshd") and not os.path.exists("/usr/sbin/sshd"):
        pytest.fail("no sshd: `./dev test` installs it (apt-get install openssh-server)")
    remove_network()
    try:
        for name in (GW, NODE):
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "link", "add", "pgjt-l0", "type", "veth", "peer", "name", "pgjt-g0",
           "netns", GW)
        sh("ip", "-n", GW, "link", "add", "pgjt-g1", "type", "veth", "peer", "name", "pgjt-n1",
           "netns", NODE)
        for ns, dev, addr in ((None, "pgjt-l0", "10.77.214.1/30"),
                              (GW, "pgjt-g0", f"{GW_ADDR}/30"),
                              (GW, "pgjt-g1", "10.77.214.5/30"),
                              (NODE, "pgjt-n1", f"{NODE_ADDR}/30")):
            prefix = ("ip", "-n", ns) if ns else ("ip",)
            sh(*prefix, "addr", "add", addr, "dev", dev)
            sh(*prefix, "link", "set", dev, "up")
        # this machine must not find the node through its default route either
        sh("ip", "route", "add", "unreachable", "10.77.214.4/30")
        yield
    finally:
        remove_network()


@pytest.fixture(scope="module")
def sshd(network):
    """A real sshd on the gateway with password logins for one test account."""
    password = secrets.token_urlsafe(12)
    if sh("id", SSH_USER, check=False).returncode != 0:
        sh("useradd", "-M", "-s", "/bin/sh", SSH_USER)
    subprocess.run(["chpasswd"], input=f"{SSH_USER}:{password}\n", text=True, check=True)
    work = Path(tempfile.mkdtemp(prefix="pgjt-sshd-"))
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "host_key"))
    (work / "sshd_config").write_text(
        f"ListenAddress {GW_ADDR}\nHostKey {work}/host_key\nPidFile {work}/sshd.pid\n"
        "UsePAM no\nPasswordAuthentication yes\nKbdInteractiveAuthentication no\n"
        f"PubkeyAuthentication no\nPermitRootLogin no\nAllowUsers {SSH_USER}\n"
        "AllowTcpForwarding yes\nStrictModes no\nLogLevel VERBOSE\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = open(work / "sshd.log", "w")
    daemon = subprocess.Popen(in_netns(GW, "/usr/sbin/sshd", "-D", "-e", "-f",
                                       str(work / "sshd_config")), stdout=log, stderr=log)
    try:
        listening = until(lambda: subprocess.run(
            in_netns(GW, "ss", "-Htln", "sport = :22"), capture_output=True,
            text=True).stdout.strip(), 20, interval=0.1)
        assert listening, (work / "sshd.log").read_text()
        yield {"password": password, "log": work / "sshd.log"}
    finally:
        daemon.terminate()
        daemon.wait(20)
        sh("passwd", "-l", SSH_USER, check=False)  # no password login left behind
        shutil.rmtree(work, ignore_errors=True)


class NodeServer:
    """`pgjob serve` on the compute node's namespace (PostgreSQL runs as postgres)."""

    def __init__(self, home: Path, log: Path) -> None:
        self.home, self.log, self.process = home, log, None

    def start(self, port: int) -> endpoint.Endpoint:
        with open(self.log, "a") as out:
            self.process = subprocess.Popen(
                in_netns(NODE, *pgjob_cmd("serve", "--home", str(self.home), "--host", NODE_ADDR,
                                          "--health-interval", "0.5")),
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PGJOB_PORT": str(port)})
        ready = subprocess.run(in_netns(NODE, *pgjob_cmd("url", "--home", str(self.home),
                                                         "--format", "json", "--wait", "60")),
                               capture_output=True, text=True, timeout=90)
        assert ready.returncode == 0, ready.stderr + self.log.read_text()
        return endpoint.read(open_home(self.home))

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            assert self.process.wait(60) == 0, self.log.read_text()


@pytest.fixture(scope="module")
def node_server(network):
    work = Path(tempfile.mkdtemp(prefix="pgjt-home-", dir="/var/tmp"))
    os.chmod(work, 0o1777)  # pgjob as root acts as postgres, which makes its home here
    home = work / "home"
    run_pgjob("init", "--home", str(home), "--allow", "10.77.214.0/24", check=True)
    served = NodeServer(home, work / "serve.log")
    served.start(5432)
    yield served
    served.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def known_hosts():
    """Where ssh keeps the gateway's key: writable by postgres, which pgjob started as
    root acts as (pytest's tmp is root-only)."""
    work = Path(tempfile.mkdtemp(prefix="pgjt-known-", dir="/var/tmp"))
    os.chmod(work, 0o1777)
    yield work / "known_hosts"
    shutil.rmtree(work, ignore_errors=True)


def tunnel_cmd(home: Path, known_hosts: Path, *extra: str) -> list[str]:
    return pgjob_cmd("tunnel", "--home", str(home), "--via", f"{SSH_USER}@{GW_ADDR}",
                     "-o", f"UserKnownHostsFile={known_hosts}",
                     "-o", "GlobalKnownHostsFile=/dev/null",
                     "-o", "StrictHostKeyChecking=ask", "-o", "PubkeyAuthentication=no", *extra)


def open_tunnel(home: Path, known_hosts: Path, password: str, *extra: str):
    """A `pgjob tunnel` on a terminal, its prompts answered; (child, URL, host key asked)."""
    cmd = tunnel_cmd(home, known_hosts, *extra)
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=60)
    asked = False
    while True:
        seen = child.expect([r"\(yes/no[^)]*\)\? ", r"password: ", URL, pexpect.EOF])
        if seen == 0:
            asked = "fingerprint is SHA256:" in child.before
            child.sendline("yes")
        elif seen == 1:
            child.sendline(password)
        elif seen == 2:
            return child, child.after, asked
        else:
            raise AssertionError(f"pgjob tunnel ended early:\n{child.before}")


def close_tunnel(child) -> None:
    child.kill(signal.SIGTERM)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert child.exitstatus == 0, child.before


def local_port(url: str) -> int:
    return int(re.search(r"@127\.0\.0\.1:(\d+)/", url).group(1))


def test_the_server_is_out_of_reach_without_the_tunnel(node_server):
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host=NODE_ADDR, port=5432, dbname="optuna", user="optuna",
                        connect_timeout=3, sslmode="require")


def test_a_tunnel_shows_ssh_prompts_and_carries_optuna_and_a_second_one_gets_its_own_port(
        node_server, sshd, known_hosts):
    first, url, asked = open_tunnel(node_server.home, known_hosts, sshd["password"])
    try:
        assert asked, "the host key's fingerprint was not shown"
        assert "verify-ca" in url
        optuna.create_study(storage=url, study_name="through-the-tunnel").optimize(
            lambda t: t.suggest_float("x", 0, 1), n_trials=3)
        with psycopg.connect(url.replace("+psycopg", "")) as conn:
            row = conn.execute("select inet_server_addr()::text, ssl from pg_stat_ssl "
                               "where pid = pg_backend_pid()").fetchone()
        assert row == (f"{NODE_ADDR}/32", True)
        second, url2, asked2 = open_tunnel(node_server.home, known_hosts, sshd["password"])
        try:
            assert not asked2  # the key is known now
            assert local_port(url2) != local_port(url)
            study = optuna.load_study(storage=url2, study_name="through-the-tunnel")
            assert len(study.trials) == 3
        finally:
            close_tunnel(second)
    finally:
        close_tunnel(first)
    with pytest.raises(OSError):  # closing the tunnel closed its port
        socket.create_connection(("127.0.0.1", local_port(url)), timeout=2)


def test_the_tunnel_follows_the_server_to_another_port(node_server, sshd, known_hosts):
    child, url, _ = open_tunnel(node_server.home, known_hosts, sshd["password"])
    try:
        optuna.create_study(storage=url, study_name="moving", load_if_exists=True)
        node_server.stop()
        moved = node_server.start(5544)
        assert moved.port == 5544
        child.expect(r"the server is now at 10\.77\.214\.6:5544", timeout=30)
        assert until(lambda: _answers(url), 20, interval=0.2), "no answer on the same URL"
        assert "moving" in [s.study_name for s in optuna.get_all_study_summaries(url)]
    finally:
        close_tunnel(child)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3) as conn:
            return conn.execute("select inet_server_port()").fetchone()[0] == 5544
    except psycopg.Error:
        return False


def test_a_wrong_password_reads_clearly(node_server, sshd, known_hosts):
    cmd = tunnel_cmd(node_server.home, known_hosts, "-o", "NumberOfPasswordPrompts=1")
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=60)
    if child.expect([r"\(yes/no[^)]*\)\? ", r"password: "]) == 0:
        child.sendline("yes")
        child.expect(r"password: ")
    child.sendline("not-the-password")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 10
    assert "authentication failed" in child.before and "Traceback" not in child.before


def test_an_unreachable_gateway_reads_clearly(node_server, known_hosts):
    done = run_pgjob(*tunnel_cmd(node_server.home, known_hosts, "-o", "Port=2222")[3:],
                     timeout=60)
    assert done.returncode == 10
    assert "unreachable (connection refused)" in done.stderr and "Traceback" not in done.stderr


def test_a_taken_local_port_reads_clearly(node_server, sshd, known_hosts):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cmd = tunnel_cmd(node_server.home, known_hosts, "--local-port",
                         str(taken.getsockname()[1]))
        child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=60)
        if child.expect([r"\(yes/no[^)]*\)\? ", r"password: "]) == 0:
            child.sendline("yes")
            child.expect(r"password: ")
        child.sendline(sshd["password"])
        child.expect(pexpect.EOF)
        child.close()
    assert child.exitstatus == 10
    assert "the local port is taken" in child.before and "Traceback" not in child.before


def dashboard_studies(home: Path, known_hosts: Path, password: str) -> list[str]:
    """The study names `pgjob dashboard --via` shows for `home`, prompts answered."""
    port = free_port()
    cmd = [*pgjob_cmd("dashboard", "--port", str(port)), *tunnel_cmd(home, known_hosts)[4:]]
    child = pexpect.spawn(cmd[0], cmd[1:], encoding="utf-8", timeout=60)
    try:
        while child.expect([r"\(yes/no[^)]*\)\? ", r"password: ", r"dashboard: http"]) != 2:
            child.sendline("yes" if "yes/no" in child.after else password)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as got:
            return [s["study_name"] for s in json.load(got)["study_summaries"]]
    finally:
        close_tunnel(child)


def test_the_dashboard_reaches_the_server_through_a_tunnel(node_server, sshd, known_hosts):
    make_study_on_the_node(node_server, "on-the-board")
    assert "on-the-board" in dashboard_studies(node_server.home, known_hosts, sshd["password"])


@pytest.fixture
def journal_node_server(network):
    """A journal home (storage = "journal") served on the node, beside node_server."""
    work = Path(tempfile.mkdtemp(prefix="pgjt-journal-", dir="/var/tmp"))
    os.chmod(work, 0o1777)
    home = work / "home"
    run_pgjob("init", "--home", str(home), "--allow", "10.77.214.0/24", "--storage",
              "journal", check=True)
    served = NodeServer(home, work / "serve.log")
    try:
        served.start(5433)
        yield served
    finally:
        served.stop()
        shutil.rmtree(work, ignore_errors=True)


def test_the_dashboard_shows_a_journal_home_s_studies_through_a_tunnel(journal_node_server,
                                                                       sshd, known_hosts):
    make_study_on_the_node(journal_node_server, "in-the-journal")
    assert dashboard_studies(journal_node_server.home, known_hosts, sshd["password"]) == \
        ["in-the-journal"]


def make_study_on_the_node(node_server, name: str) -> None:
    """A study made from the node's side, where the server is reachable without a tunnel."""
    subprocess.run(in_netns(NODE, sys.executable, "-c",
                            "import optuna, pgjob, sys\n"
                            "optuna.create_study(storage=pgjob.optuna_storage(sys.argv[1]),"
                            " study_name=sys.argv[2], load_if_exists=True)",
                            str(node_server.home), name), check=True, timeout=60,
                   capture_output=True)


def test_a_dropped_ssh_connection_is_made_again_on_the_same_port(node_server, sshd,
                                                                   known_hosts):
    import psutil

    child, url, _ = open_tunnel(node_server.home, known_hosts, sshd["password"],
                                "-o", "NumberOfPasswordPrompts=1")
    try:
        ssh, = [p for p in psutil.Process(child.pid).children() if p.name() == "ssh"]
        ssh.kill()
        child.expect("connecting again")
        child.expect("password: ")
        child.sendline("a-typo")  # a failed login is said, and tried again
        child.expect("authentication failed")
        child.expect("connecting again")
        child.expect("password: ")
        child.sendline(sshd["password"])
        assert until(lambda: _query(url), 20, interval=0.3), "no answer on the same URL"
    finally:
        close_tunnel(child)


def _query(url: str) -> bool:
    try:
        with psycopg.connect(url.replace("+psycopg", ""), connect_timeout=3) as conn:
            return conn.execute("select 1").fetchone() == (1,)
    except psycopg.Error:
        return False


def test_a_password_asked_with_no_terminal_to_answer_on_reads_clearly(node_server, sshd,
                                                                       known_hosts):
    cmd = tunnel_cmd(node_server.home, known_hosts, "-o", "StrictHostKeyChecking=no")
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 10
    assert "no terminal to answer on" in done.stderr and "Traceback" not in done.stderr
