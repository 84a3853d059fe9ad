"""PBS (PBS Pro, Torque) and LSF, from their documented job environments and commands.

Neither scheduler can run here, so each test writes small stand-in `qstat`, `qsub`,
`qdel`, `bjobs` and `bsub` executables into a folder on PATH: real processes that print
what the schedulers' documentation shows and note how they were called. The job's
environment is the documented one (PBS_JOBID, PBS_NODEFILE; LSB_JOBID, LSB_HOSTS, ...).
What pgjob does with them is real: a real `pgjob submit`, a real `pgjob serve` with a
real PostgreSQL.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import Served, run_pgjob
from pgjob import endpoint, schedulers, submission
from pgjob.home import Home, open_home
from pgjob.settings import Settings

MB = 1024 * 1024
STANDIN = """#!{python}
import json, os, sys
record = {{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                                        if k.startswith("PGJOB")}}}}
if {reads_stdin}:
    record["stdin"] = sys.stdin.read()
with open({calls!r}, "a") as calls:
    calls.write(json.dumps([{name!r}, record]) + "\\n")
sys.stdout.write({out!r})
sys.exit({code})
"""


class Standins:
    """A folder of stand-in scheduler commands, first on PATH, and what they were asked."""

    def __init__(self, folder: Path) -> None:
        self.bin = folder
        self.bin.mkdir(exist_ok=True)
        self.calls_file = folder / "calls.jsonl"

    def add(self, name: str, out: str, code: int = 0) -> None:
        path = self.bin / name
        path.write_text(STANDIN.format(python=sys.executable, reads_stdin=name == "bsub",
                                       calls=str(self.calls_file), name=name, out=out,
                                       code=code))
        path.chmod(0o755)

    def calls(self, name: str) -> list[dict]:
        if not self.calls_file.exists():
            return []
        rows = [json.loads(line) for line in self.calls_file.read_text().splitlines()]
        return [record for called, record in rows if called == name]

    def path(self, only: bool = False) -> str:
        return str(self.bin) if only else f"{self.bin}:{os.environ['PATH']}"


@pytest.fixture
def standins(tmp_path, monkeypatch) -> Standins:
    found = Standins(tmp_path / "bin")
    monkeypatch.setenv("PATH", found.path())
    return found


def ctime(epoch: float) -> str:
    """A time as qstat -f prints it (local time)."""
    return time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(epoch))


def qstat_f(job_id: str, started: float, walltime: str = "01:00:00",
            state: str = "R") -> str:
    """`qstat -f` of a running PBS Pro job, as its documentation lays it out."""
    return (f"Job Id: {job_id}\n"
            "    Job_Name = pgjob-serve\n"
            "    Job_Owner = alice@login1\n"
            f"    job_state = {state}\n"
            "    queue = workq\n"
            "    exec_host = node7/0*2\n"
            "    Output_Path = login1:/home/alice/study/home/logs/pgjob-serve.o1234\n"
            "    Resource_List.mem = 2gb\n"
            "    Resource_List.ncpus = 2\n"
            "    Resource_List.select = 1:ncpus=2:mem=2gb\n"
            f"    Resource_List.walltime = {walltime}\n"
            f"    stime = {ctime(started)}\n"
            "    Variable_List = PBS_O_HOME=/home/alice,PBS_O_WORKDIR=/home/alice/stu\n"
            "\tdy,PBS_O_QUEUE=workq\n\n")


def pbs_env(tmp_path: Path, job_id: str = "1234.pbs1") -> dict[str, str]:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("node7.cluster.example\nnode7.cluster.example\n")
    return {"PBS_JOBID": job_id, "PBS_NODEFILE": str(nodefile),
            "PBS_O_WORKDIR": str(tmp_path), "PBS_ENVIRONMENT": "PBS_BATCH"}


def bare_home(path: Path) -> Home:
    """A home with settings only: enough for `pgjob submit`, which starts no server."""
    home = Home(path)
    for folder in (home.run, home.logs):
        folder.mkdir(parents=True)
    home.save_settings(Settings())
    return home


def test_a_pbs_job_knows_its_node_memory_and_end_from_qstat(standins, tmp_path):
    started = time.time() - 600
    standins.add("qstat", qstat_f("1234.pbs1", started))
    job = schedulers.current(pbs_env(tmp_path))
    assert (job.scheduler, job.job_id, job.node) == ("pbs", "1234.pbs1", "node7")
    assert job.memory_bytes <= 2048 * MB
    assert job.end_time == pytest.approx(int(started) + 3600, abs=2)
    assert not job.warned_before_end  # so serve stops by itself
    assert standins.calls("qstat")[0]["argv"] == ["-f", "1234.pbs1"]


def test_a_job_pbs_has_forgotten_is_unknown(standins):
    standins.add("qstat", "qstat: Unknown Job Id 77.pbs1\n", code=153)
    assert schedulers.query("pbs", "77.pbs1") == schedulers.QueueState("UNKNOWN", None, "")


def test_an_lsf_job_knows_its_host_and_end_from_bjobs(standins):
    standins.add("bjobs", "RUN|2*hostA:2*hostB|01:00:00 L\n")
    job = schedulers.current({"LSB_JOBID": "4242", "LSB_HOSTS": "hostA hostA hostB",
                              "LSB_MCPU_HOSTS": "hostA 2 hostB 2"})
    assert (job.scheduler, job.job_id, job.node) == ("lsf", "4242", "hostA")
    assert job.end_time == pytest.approx(time.time() + 3600, abs=5)
    assert job.warned_before_end  # the job script asks for SIGUSR1 (bsub -wa/-wt)
    argv = standins.calls("bjobs")[0]["argv"]
    assert argv[-1] == "4242" and "time_left" in argv[argv.index("-o") + 1]
    assert schedulers.query("lsf", "4242") == schedulers.QueueState("RUNNING", 3600, "hostA")


def test_pgjob_submit_with_qsub_passes_the_home_and_script(standins, tmp_path):
    standins.add("qsub", "1234.pbs1\n")
    home = bare_home(tmp_path / "home")
    done = run_pgjob("submit", "--home", str(home.path), "--scheduler", "pbs",
                     "-l", "walltime=8:00:00", env={"PATH": standins.path()}, check=True)
    assert done.stdout.strip() == "1234.pbs1"
    argv = standins.calls("qsub")[0]["argv"]
    variables = dict(v.split("=", 1) for v in argv[argv.index("-v") + 1].split(","))
    assert variables["PGJOB_HOME"] == str(home.path)
    assert variables["PGJOB_SCRIPT"].endswith("pgjob-serve.pbs")
    assert argv[-1].endswith("pgjob-serve.pbs") and "walltime=8:00:00" in argv
    assert json.loads(home.submitted.read_text())["scheduler"] == "pbs"


def test_pgjob_submit_finds_bsub_and_feeds_it_the_script(standins, tmp_path):
    standins.add("bsub", "Job <4242> is submitted to default queue <normal>.\n")
    home = bare_home(tmp_path / "home")
    done = run_pgjob("submit", "--home", str(home.path), "-q", "long",
                     env={"PATH": standins.path(only=True)}, check=True)
    assert done.stdout.strip() == "4242"
    call = standins.calls("bsub")[0]
    assert call["argv"][-2:] == ["-q", "long"]
    assert "#BSUB -wa USR1" in call["stdin"] and "#BSUB -wt 5" in call["stdin"]
    assert call["env"]["PGJOB_HOME"] == str(home.path)


def test_pgjob_submit_without_any_scheduler_says_what_it_needs(standins, tmp_path):
    home = bare_home(tmp_path / "home")
    done = run_pgjob("submit", "--home", str(home.path), env={"PATH": standins.path(only=True)})
    assert done.returncode == 3
    assert "none of sbatch, bsub, qsub is on PATH" in done.stderr


def test_lsf_successor_waits_for_the_job_to_end_then_is_cancelled_with_bkill(
        standins, tmp_path, monkeypatch):
    standins.add("bsub", "Job <4243> is submitted to queue <long>.\n")
    standins.add("bkill", "Job <4243> is being terminated\n")
    monkeypatch.setenv("LSB_QUEUE", "long")
    monkeypatch.setenv("LSB_JOBNAME", "pgjob-serve")
    home = bare_home(tmp_path / "home")
    assert submission.submit_successor(home, "4242", "lsf") == "4243"
    call = standins.calls("bsub")[0]
    assert call["argv"][:2] == ["-w", "ended(4242)"]
    assert ["-q", "long", "-J", "pgjob-serve"] == call["argv"][-4:]
    assert "#BSUB -wa USR1" in call["stdin"] and call["env"]["PGJOB_HOME"] == str(home.path)
    assert submission.cancel_successor(home) == "4243"
    assert standins.calls("bkill")[0]["argv"] == ["4243"]


@pytest.mark.pg
def test_serve_under_pbs_stops_itself_before_the_walltime_and_leaves_a_successor(
        standins, home_path, tmp_path):
    """A PBS job with 36 s of walltime: serve publishes, queues its successor with qsub,
    and stops cleanly 15 s (the margin) before the end, without cancelling the successor."""
    started = time.time()
    end = int(started) + 36
    standins.add("qstat", qstat_f("1234.pbs1", started, walltime="00:00:36"))
    standins.add("qsub", "1235.pbs1\n")
    standins.add("qdel", "")
    served = Served(home_path, tmp_path / "serve.log", "--renew",
                    env={**pbs_env(tmp_path), "PATH": standins.path(),
                         "PGJOB_STOP_MARGIN": "15"})
    found = served.endpoint(timeout=30)
    assert (found.scheduler, found.job_id, found.node) == ("pbs", "1234.pbs1", "node7")

    assert served.process.wait(timeout=end - time.time() + 10) == 0
    log = served.log.read_text()
    assert time.time() < end, log  # it did not wait for the walltime's SIGTERM
    assert "stopping: the job's time limit is near" in log, log
    assert "PostgreSQL stopped cleanly" in log
    assert endpoint.read(open_home(home_path)) is None  # withdrawn: workers wait
    qsub = standins.calls("qsub")[0]["argv"]
    assert qsub[qsub.index("-W") + 1] == "depend=afterany:1234.pbs1"
    assert "walltime=00:00:36" in qsub and "select=1:ncpus=2:mem=2gb" in qsub
    assert qsub[-1].endswith("pgjob-serve.pbs")
    assert not standins.calls("qdel")  # the chain goes on
    assert json.loads(open_home(home_path).successor.read_text())["job_id"] == "1235.pbs1"


def test_status_shows_a_submitted_pbs_job_waiting_in_the_queue(standins, tmp_path):
    standins.add("qsub", "1234.pbs1\n")
    standins.add("qstat", qstat_f("1234.pbs1", time.time(), state="Q"))
    home = bare_home(tmp_path / "home")
    run_pgjob("submit", "--home", str(home.path), "--scheduler", "pbs", check=True)
    status = run_pgjob("status", "--home", str(home.path), "--json")
    facts = json.loads(status.stdout)
    assert status.returncode == 2  # nothing published yet
    assert (facts["job_id"], facts["job_state"]) == ("1234.pbs1", "PENDING")
