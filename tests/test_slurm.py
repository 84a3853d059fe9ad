"""End to end on a real Slurm cluster: three nodes, each with its own address.

tests/cluster/up.sh (run by `./dev test` as root) builds the cluster; these tests submit
jobs as the unprivileged user running the suite. The host stands in for the login node.
"""
from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import run_pgjob, trial_states
from pgjob import binaries, endpoint, schedulers
from pgjob.cluster import cluster_state
from pgjob.home import open_home
from pgjob.initialize import init
from pgjob.waiting import until

pytestmark = [pytest.mark.cluster, pytest.mark.pg]

REPO = Path(__file__).resolve().parent.parent
SERVE_SCRIPT = REPO / "jobscripts" / "pgjob-serve.sh"
WORKER_SCRIPT = REPO / "jobscripts" / "optuna-worker.sh"
OBJECTIVE = REPO / "jobscripts" / "example_objective.py"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "UNKNOWN", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


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

    def state(self, job: str) -> schedulers.QueueState:
        return schedulers.query("slurm", job)

    def wait_state(self, job: str, states: set[str], timeout: float) -> str:
        got = until(lambda: (s := self.state(job).state) in states and s, timeout, 0.5)
        assert got, f"job {job} is {self.state(job).state}, not one of {states}"
        return got

    def ours(self) -> set[str]:
        """This test's jobs still queued or running, by their array's id (which scancel
        takes for the whole array, or the job's own id): those it submitted, and those
        submitted from its folder (the successors renewing servers queue carry the folder
        along, and submitit's workers are submitted from it). The same user's other jobs
        are not ours: tests/test_root.py runs its own beside these."""
        listed = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%F|%Z"],
                                capture_output=True, text=True, timeout=30).stdout
        return {job for job, folder in (line.split("|", 1) for line in listed.splitlines())
                if job in self.jobs or Path(folder).is_relative_to(self.workdir)}

    def cancel_all(self) -> None:
        if jobs := self.ours():
            subprocess.run(["scancel", *jobs], check=True, timeout=30)
        assert until(lambda: not self.ours(), 60, 0.5), f"jobs left on the cluster: {self.ours()}"


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
    return cluster_state(bindir, home / "data")


# Heartbeats and grace short enough for a test; the defaults are 30 s and 120 s.
FAST = {"PGJOB_HEARTBEAT_INTERVAL": "2", "PGJOB_GRACE_PERIOD": "10"}


def serve_job(slurm: Slurm, home: Path, node: str, *extra: str, renew: bool = False) -> str:
    # The test nodes have 4000 MB; the script's default of 4G is for real clusters.
    return slurm.sbatch("-w", node, "--mem=1G", f"--output={home.parent}/serve-%j.out", *extra,
                        str(SERVE_SCRIPT), str(home),
                        env={**FAST, "PGJOB_RENEW": "1" if renew else "0"})


def worker_job(slurm: Slurm, home: Path, node: str, study: str, trials: int,
               sleep: float) -> str:
    return slurm.sbatch("-w", node, "--array=1", "--mem=500M",
                        f"--output={slurm.workdir}/worker-%A_%a.out",
                        str(WORKER_SCRIPT), str(OBJECTIVE), "--sleep", str(sleep),
                        env={**FAST, "PGJOB_HOME": str(home), "STUDY": study,
                             "TRIALS": str(trials)})


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


def test_the_same_worker_jobs_run_a_study_on_a_journal_home(cluster, slurm, tmp_path):
    """`pgjob init --storage journal`, then the unchanged job scripts: the workers on two
    nodes share the study through the journal, and nothing else is made in the database."""
    home = tmp_path / "home"
    run_pgjob("init", "--home", str(home), "--workers", "16", "--storage", "journal",
              check=True)
    server = serve_job(slurm, home, "node1")
    found = published(home)
    workers = [worker_job(slurm, home, node, "journal-cross-node", 15, 0.1)
               for node in ("node2", "node3")]
    for job in workers:
        assert slurm.wait_state(job, FINISHED, 180) == "COMPLETED", worker_logs(slurm)
    assert "waiting for the server" in worker_logs(slurm)
    import optuna

    import pgjob
    trials = optuna.load_study(study_name="journal-cross-node",
                               storage=pgjob.optuna_storage(home, wait=30)).trials
    assert sorted(t.number for t in trials) == list(range(30))
    assert {t.state.name for t in trials} == {"COMPLETE"}
    with found.connect() as conn:
        assert conn.execute("select to_regclass('public.trials')").fetchone()[0] is None
    run_pgjob("stop", "--home", str(home), "--wait", "60", check=True)
    assert slurm.wait_state(server, FINISHED, 60) == "COMPLETED"


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


# ---- issue 4: nothing lost -------------------------------------------------------------

def crash(*needles: str) -> int:
    """SIGKILL, all at once, to every process of ours whose command line holds all needles:
    a node dying or the OOM killer, which no scancel reproduces (Slurm sends SIGTERM first)."""
    me = os.getuid()
    doomed = [p for p in psutil.process_iter(["uids", "cmdline"])
              if p.info["uids"] and p.info["uids"].real == me and p.pid != os.getpid()
              and all(n in " ".join(p.info["cmdline"] or []) for n in needles)]
    # the postmaster first: killing serve first would make the kernel ask it for a clean
    # shutdown (PR_SET_PDEATHSIG), which is not the crash we want
    for p in sorted(doomed, key=lambda p: p.name() != "postgres"):
        p.kill()
    return len(doomed)


def test_killed_server_job_moves_to_another_node_and_workers_finish(
        cluster, slurm, cluster_home):
    first = serve_job(slurm, cluster_home, "node1")
    before = published(cluster_home)
    workers = [worker_job(slurm, cluster_home, node, "moved", 15, 0.5)
               for node in ("node2", "node3")]
    assert until(lambda: trial_states(before, "moved").get("COMPLETE", 0) >= 6, 120)
    assert crash(str(cluster_home)) >= 2  # pgjob serve and the postmaster, at once
    slurm.wait_state(first, FINISHED, 60)
    assert until(lambda: not postmasters_of(cluster_home), 30)
    serve_job(slurm, cluster_home, "node3")
    after = published(cluster_home)
    assert after.host == cluster["NODE3_ADDR"] and after.generation > before.generation
    for job in workers:
        assert slurm.wait_state(job, FINISHED, 240) == "COMPLETED", worker_logs(slurm)
    assert "Traceback" not in worker_logs(slurm)
    assert trial_states(after, "moved").get("COMPLETE") >= 30
    # after the grace period nothing is left RUNNING (a trial cut short is failed, retried)
    assert until(lambda: "RUNNING" not in trial_states(after, "moved"), 60)
    log = (cluster_home / "logs" / "postgresql.log").read_text()
    assert "not properly shut down" in log  # it really was a crash, recovered from the WAL


def test_a_second_server_on_another_node_is_refused(cluster, slurm, cluster_home):
    serve_job(slurm, cluster_home, "node1")
    found = published(cluster_home)
    second = serve_job(slurm, cluster_home, "node2")
    assert slurm.wait_state(second, FINISHED, 60) == "FAILED"
    log = (cluster_home.parent / f"serve-{second}.out").read_text()
    assert "already answers" in log and "Traceback" not in log
    assert endpoint.check(found) is None and published(cluster_home) == found


def test_a_server_whose_lease_is_stolen_stops(cluster, slurm, cluster_home):
    from pgjob import lease

    job = serve_job(slurm, cluster_home, "node2")
    published(cluster_home)
    lease._create(open_home(cluster_home), lease.Lease(
        token="thief", node="elsewhere", job_id="0", pid=1, create_time=0.0, generation=99,
        renewed_at=time.time()))
    assert slurm.wait_state(job, FINISHED, 60) == "FAILED"
    assert until(lambda: not postmasters_of(cluster_home), 30)
    assert "lost the home's lease" in (cluster_home.parent / f"serve-{job}.out").read_text()


def test_renewal_carries_a_study_across_short_jobs(cluster, slurm, cluster_home):
    first = serve_job(slurm, cluster_home, "node1", "--time=1", "--signal=B:TERM@40",
                      renew=True)
    start = published(cluster_home)
    workers = [worker_job(slurm, cluster_home, node, "renewed", 40, 2.5)
               for node in ("node2", "node3")]
    # two renewals while the workers run: three server jobs in all
    assert until(lambda: (e := endpoint.read(open_home(cluster_home))) is not None
                 and e.generation >= start.generation + 2, 240, 1)
    assert all(slurm.state(w).state == "RUNNING" for w in workers)
    assert slurm.state(first).state == "COMPLETED"
    for job in workers:
        assert slurm.wait_state(job, FINISHED, 300) == "COMPLETED", worker_logs(slurm)
    assert trial_states(published(cluster_home), "renewed").get("COMPLETE") >= 80
    # pgjob stop ends the chain: no serve job is left, queued or running
    run_pgjob("stop", "--home", str(cluster_home), "--wait", "60", check=True)
    assert until(lambda: not subprocess.run(["squeue", "-h", "-u", getpass.getuser()],
                                            capture_output=True, text=True).stdout.strip(),
                 30, 0.5)


def test_a_killed_worker_s_trial_is_failed_and_retried(cluster, slurm, cluster_home):
    serve_job(slurm, cluster_home, "node1")
    found = published(cluster_home)
    worker_job(slurm, cluster_home, "node2", "retried", 1, 600)
    assert until(lambda: trial_states(found, "retried").get("RUNNING") == 1, 90)
    time.sleep(3)  # a heartbeat or two
    assert crash(str(OBJECTIVE), "--study retried") == 1
    assert until(lambda: trial_states(found, "retried") == {"FAIL": 1, "WAITING": 1}, 90)
    rescuer = worker_job(slurm, cluster_home, "node3", "retried", 1, 0)
    assert slurm.wait_state(rescuer, FINISHED, 120) == "COMPLETED", worker_logs(slurm)
    assert trial_states(found, "retried") == {"FAIL": 1, "COMPLETE": 1}


def test_a_trial_cut_short_by_a_requeue_is_failed_while_the_job_runs_again(
        cluster, slurm, cluster_home):
    """Slurm requeues a job under the same id (preemption, `scontrol requeue`); released at
    once, it runs again before any sweep saw it pending. The trial of its first run has lost
    its worker all the same: the server fails it and queues its retry while the job's
    second run goes on, not when that run ends hours later. (serve is stopped meanwhile, so
    that no sweep falls in the moment the job is not running.)"""
    server = serve_job(slurm, cluster_home, "node1")
    found = published(cluster_home)
    job = worker_job(slurm, cluster_home, "node2", "requeued", 1, 600)
    assert until(lambda: trial_states(found, "requeued").get("RUNNING") == 1, 90), \
        (trial_states(found, "requeued"), worker_logs(slurm))
    time.sleep(3)  # a heartbeat or two, with the job's run recorded
    with found.connect() as conn:
        beats = conn.execute("select trial_id, job from pgjob_heartbeats").fetchall()
    assert len(beats) == 1, (beats, worker_logs(slurm), trial_states(found, "requeued"))
    (first, recorded), = beats
    assert recorded == f"slurm:{job}@0"
    serve = psutil.Process(open_home(cluster_home).read_record(
        open_home(cluster_home).serve_record)["pid"])
    serve.suspend()
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
        assert until(lambda: requeued(job) == 1, 30), requeued(job)
        slurm.wait_state(job, {"PENDING"}, 60)  # Slurm holds it back a while: not here
        # but a run started within the second its last run's credential was revoked is
        # killed by slurmd ("Job credential revoked"): that is what the hold is for
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True,
                       timeout=30)
        slurm.wait_state(job, {"RUNNING"}, 60)
    finally:
        serve.resume()
    assert until(lambda: trial_state(found, first) == "FAIL", 30), trial_states(found, "requeued")
    assert slurm.state(job).state == "RUNNING"  # failed while the second run goes on
    log = (cluster_home.parent / f"serve-{server}.out").read_text()
    assert f"its job slurm:{job} was requeued and runs again without it" in log, log[-2000:]
    # a retry of the trial is queued: the second run takes it, or a trial of its own
    # while the retry waits for the next worker
    assert until(lambda: trial_states(found, "requeued") in (
        {"FAIL": 1, "RUNNING": 1}, {"FAIL": 1, "RUNNING": 1, "WAITING": 1}), 60), \
        trial_states(found, "requeued")
    with found.connect() as conn:
        retries = conn.execute(
            "select t.state::text from trials t join trial_system_attributes a using (trial_id)"
            " where a.key = 'failed_trial'").fetchall()
    assert [state for state, in retries] in (["RUNNING"], ["WAITING"]), retries


def requeued(job: str) -> int:
    """How many times Slurm has requeued `job`, as `scontrol show job` says (Restarts=)."""
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                           timeout=30).stdout
    return next((int(word[9:]) for word in shown.split() if word.startswith("Restarts=")), 0)


def trial_state(found, trial_id: int) -> str:
    with found.connect() as conn:
        return conn.execute("select state::text from trials where trial_id = %s",
                            (trial_id,)).fetchone()[0]


def test_backup_from_the_login_node_restores_into_a_new_home(cluster, slurm, cluster_home,
                                                              tmp_path):
    serve_job(slurm, cluster_home, "node1")
    found = published(cluster_home)
    worker = worker_job(slurm, cluster_home, "node2", "saved", 5, 0)
    assert slurm.wait_state(worker, FINISHED, 120) == "COMPLETED"
    made = run_pgjob("backup", "--home", str(cluster_home), check=True).stdout.split()[-1]
    restored = tmp_path / "restored" / "home"
    restored.parent.mkdir()
    run_pgjob("restore", made, "--home", str(restored), check=True)
    serve_job(slurm, restored, "node3")
    again = published(restored)
    assert again.host == cluster["NODE3_ADDR"]
    assert trial_states(again, "saved") == trial_states(found, "saved") == {"COMPLETE": 5}


def test_a_worker_s_job_decides_its_trial_not_a_late_heartbeat(cluster, slurm, cluster_home):
    """A worker stopped in a job that still runs (a stalled node, a debugger) keeps its
    trial however late its heartbeat; once its job ends, the trial is failed and re-queued
    at the server's next sweep, without waiting out the grace period."""
    serve_job(slurm, cluster_home, "node1")
    found = published(cluster_home)
    job = worker_job(slurm, cluster_home, "node2", "judged", 1, 600)
    assert until(lambda: trial_states(found, "judged").get("RUNNING") == 1, 90)
    time.sleep(3)  # a heartbeat or two, with the worker's job recorded
    with found.connect() as conn:
        recorded = conn.execute("select job from pgjob_heartbeats").fetchall()
    assert [row[0].split(":")[0] for row in recorded] == ["slurm"], recorded
    stopped = [p for p in psutil.process_iter(["cmdline"])
               if "--study judged" in " ".join(p.info["cmdline"] or [])]
    assert stopped, "the worker's process was not found"
    for p in stopped:
        p.suspend()
    time.sleep(25)  # two and a half grace periods of silence
    assert trial_states(found, "judged") == {"RUNNING": 1}
    subprocess.run(["scancel", job], check=True, timeout=30)
    slurm.wait_state(job, FINISHED, 60)
    assert until(lambda: trial_states(found, "judged") == {"FAIL": 1, "WAITING": 1}, 9), \
        trial_states(found, "judged")
