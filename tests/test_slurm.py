"""End to end on a real Slurm cluster: three nodes, each with its own address.

tests/cluster/up.sh (run by `./dev test` as root) builds the cluster; these tests submit
jobs as the unprivileged user running the suite. The host stands in for the login node.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import run_pgjob
from pgjob import binaries, endpoint, scheduler
from pgjob.cluster import cluster_state
from pgjob.home import open_home
from pgjob.initialize import init
from pgjob.waiting import until

pytestmark = [pytest.mark.cluster, pytest.mark.pg]

ENV_FILE = Path("/run/pgjob-testcluster/env")
REPO = Path(__file__).resolve().parent.parent
SERVE_SCRIPT = REPO / "jobscripts" / "pgjob-serve.sh"
WORKER_SCRIPT = REPO / "jobscripts" / "optuna-worker.sh"
OBJECTIVE = REPO / "jobscripts" / "example_objective.py"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "UNKNOWN", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def cluster() -> dict:
    if not ENV_FILE.exists():
        reason = ("no Slurm test cluster is up (tests/cluster/up.sh needs root; `./dev test` "
                  "as root starts it)")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    return dict(line.split("=", 1) for line in ENV_FILE.read_text().split() if "=" in line)


class Slurm:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.jobs: list[str] = []
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}",
                    "PYTHON": sys.executable}

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                              cwd=self.workdir, env={**self.env, **(env or {})}, timeout=60)
        assert done.returncode == 0, done.stderr
        job = done.stdout.strip().split(";")[0]
        self.jobs.append(job)
        return job

    def state(self, job: str) -> scheduler.QueueState:
        return scheduler.query("slurm", job)

    def wait_state(self, job: str, states: set[str], timeout: float) -> str:
        got = until(lambda: (s := self.state(job).state) in states and s, timeout, 0.5)
        assert got, f"job {job} is {self.state(job).state}, not one of {states}"
        return got

    def cancel_all(self) -> None:
        for job in self.jobs:
            subprocess.run(["scancel", job], capture_output=True, timeout=30)
        for job in self.jobs:
            until(lambda: self.state(job).state in FINISHED, 60, 0.5)


@pytest.fixture
def slurm(cluster, tmp_path):
    jobs = Slurm(tmp_path)
    yield jobs
    jobs.cancel_all()


@pytest.fixture
def cluster_home(tmp_path) -> Path:
    path = tmp_path / "home"
    init(path, workers=16)  # allowed networks: the serving node's, computed at serve
    return path


def published(home: Path, timeout: float = 90) -> endpoint.Endpoint:
    return endpoint.wait_connectable(open_home(home), timeout=timeout)


def postmasters_of(home: Path) -> list[psutil.Process]:
    data = str(home / "data")
    return [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "postgres" and data in (p.info["cmdline"] or [])]


def controldata_state(home: Path) -> str:
    bindir = binaries.find(open_home(home).settings().pg_bin)
    return cluster_state(bindir, home / "data", None)


def serve_job(slurm: Slurm, home: Path, node: str, *extra: str) -> str:
    # The test nodes have 4000 MB; the script's default of 4G is for real clusters.
    return slurm.sbatch("-w", node, "--mem=1G", f"--output={home.parent}/serve-%j.out", *extra,
                        str(SERVE_SCRIPT), str(home))


def worker_job(slurm: Slurm, home: Path, node: str, study: str, trials: int,
               sleep: float) -> str:
    return slurm.sbatch("-w", node, "--array=1", "--mem=500M", f"--output={slurm.workdir}/worker-%A_%a.out",
                        str(WORKER_SCRIPT), str(OBJECTIVE), "--sleep", str(sleep),
                        env={"PGJOB_HOME": str(home), "STUDY": study, "TRIALS": str(trials)})


def trial_states(found: endpoint.Endpoint, study: str) -> dict[str, int]:
    with found.connect() as conn:
        rows = conn.execute("select t.state::text, count(*) from trials t join studies s "
                            "using (study_id) where s.study_name = %s group by 1",
                            (study,)).fetchall()
    return dict(rows)


def worker_logs(slurm: Slurm) -> str:
    return "\n".join(p.read_text() for p in sorted(slurm.workdir.glob("worker-*.out")))


def test_workers_on_two_nodes_share_one_study_with_the_server_on_a_third(
        cluster, slurm, cluster_home):
    server = run_pgjob("submit", "--home", str(cluster_home), "-w", "node1", "--mem=1G",
                       env=slurm.env, check=True).stdout.strip()
    slurm.jobs.append(server)
    found = published(cluster_home)
    assert found.host == cluster["NODE1_ADDR"] and found.node == "node1"
    assert found.job_id == server and found.scheduler == "slurm"

    workers = [worker_job(slurm, cluster_home, node, "cross-node", 20, 0.3)
               for node in ("node2", "node3")]
    # While they run, the login node sees a healthy server with both nodes connected.
    seen_clients: set[str] = set()

    def both_nodes_connected():
        with found.connect() as conn:
            seen_clients.update(r[0] for r in conn.execute(
                "select host(client_addr) from pg_stat_activity "
                "where client_addr is not null").fetchall())
        return {cluster["NODE2_ADDR"], cluster["NODE3_ADDR"]} <= seen_clients

    assert until(both_nodes_connected, 120, 0.3), seen_clients
    status = run_pgjob("status", "--home", str(cluster_home), "--json")
    facts = json.loads(status.stdout)
    assert status.returncode == 0, status.stdout
    assert facts["connections"] >= 3 and facts["job_state"] == "RUNNING"
    assert facts["time_left_seconds"] > 0

    for job in workers:
        assert slurm.wait_state(job, FINISHED, 180) == "COMPLETED", worker_logs(slurm)
    assert trial_states(found, "cross-node") == {"COMPLETE": 40}
    run_pgjob("stop", "--home", str(cluster_home), "--wait", "60", check=True)
    assert slurm.wait_state(server, FINISHED, 60) == "COMPLETED"
    assert (cluster_home / "logs" / f"serve-{server}.out").exists()


def test_scancel_stops_the_server_cleanly_on_its_node(cluster, slurm, cluster_home):
    job = serve_job(slurm, cluster_home, "node2")
    found = published(cluster_home)
    assert found.host == cluster["NODE2_ADDR"]
    assert postmasters_of(cluster_home)
    subprocess.run(["scancel", job], check=True, timeout=30)
    slurm.wait_state(job, FINISHED, 60)
    assert until(lambda: not postmasters_of(cluster_home), 30)
    assert controldata_state(cluster_home) == "shut down"
    assert endpoint.read(open_home(cluster_home)) is None
    log = (cluster_home.parent / f"serve-{job}.out").read_text()
    assert "stopping: SIGTERM" in log and "stopped cleanly" in log


def test_walltime_signal_stops_the_server_before_the_kill(cluster, slurm, cluster_home):
    # Slurm sends the early signal up to a minute early in its 30 s sweeps.
    job = serve_job(slurm, cluster_home, "node3", "--time=1", "--signal=B:TERM@30")
    published(cluster_home)
    assert slurm.wait_state(job, FINISHED, 150) == "COMPLETED"
    log = (cluster_home.parent / f"serve-{job}.out").read_text()
    assert "stopping: SIGTERM" in log and "stopped cleanly" in log
    assert controldata_state(cluster_home) == "shut down"
    assert not postmasters_of(cluster_home)


def test_workers_submitted_before_the_server_wait_then_finish(cluster, slurm, cluster_home):
    worker = worker_job(slurm, cluster_home, "node2", "early", 6, 0.0)
    slurm.wait_state(worker, {"RUNNING"}, 60)
    assert until(lambda: "waiting for the server" in worker_logs(slurm), 30)
    assert slurm.state(worker).state == "RUNNING"  # still waiting, not failed
    serve_job(slurm, cluster_home, "node1")
    assert slurm.wait_state(worker, FINISHED, 180) == "COMPLETED", worker_logs(slurm)
    assert trial_states(published(cluster_home), "early") == {"COMPLETE": 6}
    assert "server found" in worker_logs(slurm)


def test_two_homes_served_on_one_node_do_not_collide(cluster, slurm, tmp_path):
    homes = [tmp_path / "a" / "home", tmp_path / "b" / "home"]
    for home in homes:
        home.parent.mkdir()
        init(home, workers=4)
        serve_job(slurm, home, "node1")
    first, second = (published(h) for h in homes)
    assert first.host == second.host == cluster["NODE1_ADDR"]
    assert first.port != second.port
    for found in (first, second):
        with found.connect() as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    assert first.system_identifier != second.system_identifier
    sockets = {(h / "data" / "pgjob.conf").read_text().split("unix_socket_directories = ")[1]
               .splitlines()[0] for h in homes}
    assert len(sockets) == 2
