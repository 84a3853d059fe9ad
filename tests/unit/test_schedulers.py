"""What the batch system tells a job, without any batch system: parsing each scheduler's
answers (squeue, qstat -f, bjobs), detection from job environments, the command lines
for serve jobs and their successors, the registry, and the job's end in `current()`.

PATH holds only a folder of stand-ins, so no real squeue or qstat is ever asked; where a
test needs an answer, the stand-in is a small real program that prints it.
"""
from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest

from pgjob import heartbeat, schedulers, submission
from pgjob.errors import UsageError
from pgjob.home import Home
from pgjob.schedulers import base, lsf, pbs, slurm

MB = 1024 * 1024


class Standins:
    """Stand-in scheduler commands in the only folder on PATH, and what they were asked."""

    def __init__(self, folder: Path) -> None:
        self.bin = folder
        self.bin.mkdir()
        self.log = folder / "calls.jsonl"

    def add(self, name: str, out: str = "", code: int = 0) -> None:
        path = self.bin / name
        path.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"with open({str(self.log)!r}, 'a') as f:\n"
                        f"    f.write(json.dumps([{name!r}, sys.argv[1:]]) + '\\n')\n"
                        f"sys.stdout.write({out!r})\nsys.exit({code})\n")
        path.chmod(0o755)

    def calls(self, name: str) -> list[list[str]]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [argv for called, argv in rows if called == name]


@pytest.fixture(autouse=True)
def standins(tmp_path, monkeypatch) -> Standins:
    found = Standins(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(found.bin))
    return found


# Detection and the job's facts from its environment

def test_slurm_job_memory_per_node_and_per_cpu():
    job = schedulers.current({"SLURM_JOB_ID": "42", "SLURMD_NODENAME": "c17",
                              "SLURM_MEM_PER_NODE": "2048"})
    assert (job.scheduler, job.job_id, job.node) == ("slurm", "42", "c17")
    assert job.memory_bytes == 2048 * MB
    job = schedulers.current({"SLURM_JOB_ID": "43", "SLURM_MEM_PER_CPU": "500",
                              "SLURM_CPUS_ON_NODE": "4"})
    assert job.memory_bytes == 2000 * MB


def test_outside_a_scheduler_the_machine_memory_is_the_bound():
    job = schedulers.current({})
    assert job.scheduler == "none" and job.job_id == ""
    assert job.memory_bytes > 0 and job.end_time is None


def test_other_schedulers_are_detected():
    assert schedulers.detect({"PBS_JOBID": "7.pbs"}) == "pbs"
    assert schedulers.detect({"LSB_JOBID": "9"}) == "lsf"


def test_time_left_from_the_job_end():
    job = schedulers.current({"SLURM_JOB_ID": "1", "SLURM_JOB_END_TIME": "1000"})
    assert job.time_left(now=400) == 600


def test_slurm_stays_warned_and_env_only():
    job = schedulers.current({"SLURM_JOB_ID": "5", "SLURMD_NODENAME": "c1",
                              "SLURM_JOB_END_TIME": "2000"})
    assert job.warned_before_end and job.end_time == 2000 and job.node == "c1"


def test_each_scheduler_names_its_node_from_its_own_variables(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("node7.cluster.example\nnode8.cluster.example\n")
    assert schedulers.node_name({"PBS_JOBID": "1.s", "PBS_NODEFILE": str(nodefile)}) == "node7"
    assert schedulers.node_name({"LSB_JOBID": "9", "LSB_HOSTS": "hostA hostA hostB"}) == "hostA"
    assert schedulers.node_name({"LSB_JOBID": "9", "LSB_MCPU_HOSTS": "hostC 2"}) == "hostC"
    assert schedulers.node_name({"SLURM_JOB_ID": "3", "SLURMD_NODENAME": "c4"}) == "c4"
    here = socket.gethostname().split(".")[0]
    assert schedulers.node_name({}) == here
    # a job whose table names no node (an empty node file) falls back to the host name
    (tmp_path / "empty").write_text("")
    assert schedulers.node_name({"PBS_JOBID": "1.s", "PBS_NODEFILE": str(tmp_path / "empty")}) \
        == here


def test_only_pbs_leaves_the_job_to_stop_itself_before_its_end():
    env = {"SLURM_JOB_ID": "1", "SLURM_JOB_END_TIME": "1"}
    assert schedulers.current(env).warned_before_end
    assert schedulers.current({"LSB_JOBID": "2"}).warned_before_end
    assert not schedulers.current({"PBS_JOBID": "3.s"}).warned_before_end
    assert schedulers.current({}).warned_before_end


def test_a_worker_records_its_job_as_scheduler_and_id(monkeypatch):
    for var in ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID"):
        monkeypatch.delenv(var, raising=False)
    assert heartbeat.this_job() == ""
    monkeypatch.setenv("PBS_JOBID", "12.pbs1")
    assert heartbeat.this_job() == "pbs:12.pbs1"
    monkeypatch.delenv("PBS_JOBID")
    # Slurm tells a job which run it is: none in the first, the count after requeues
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert heartbeat.this_job() == "slurm:7@0"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert heartbeat.this_job() == "slurm:7@2"


def test_cgroup_v2_and_v1_limits(tmp_path):
    root = tmp_path / "cg"
    (root / "job").mkdir(parents=True)
    (root / "job" / "memory.max").write_text("1073741824\n")
    v2 = tmp_path / "v2"
    v2.write_text("0::/job\n")
    assert schedulers.cgroup_memory(v2, root) == 1024 * MB
    (root / "memory" / "slurm").mkdir(parents=True)
    (root / "memory" / "slurm" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    v1 = tmp_path / "v1"
    v1.write_text("4:memory:/slurm\n1:cpu:/\n")
    assert schedulers.cgroup_memory(v1, root) is None  # "unlimited"


# The job's end: current() is the one place that says it

def test_a_slurm_end_in_the_environment_is_believed_without_asking_squeue(standins):
    standins.add("squeue", "RUNNING|10:00|c1\n")
    job = schedulers.current({"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "5000"})
    assert job.end_time == 5000
    assert standins.calls("squeue") == []


def test_without_slurm_job_end_time_the_end_comes_from_squeue(standins):
    standins.add("squeue", "RUNNING|1:00:00|c1\n")
    job = schedulers.current({"SLURM_JOB_ID": "7", "SLURM_MEM_PER_NODE": "100"})
    assert job.end_time == pytest.approx(time.time() + 3600, abs=5)
    assert job.memory_bytes == 100 * MB  # the environment's, not squeue's
    assert standins.calls("squeue") == [["-h", "-j", "7", "-o", "%T|%L|%N"]]


def test_a_slurm_job_with_no_limit_or_no_squeue_has_no_end(standins):
    assert schedulers.current({"SLURM_JOB_ID": "7"}).end_time is None  # no squeue here
    standins.add("squeue", "RUNNING|UNLIMITED|c1\n")
    assert schedulers.current({"SLURM_JOB_ID": "7"}).end_time is None


# Parsing each scheduler's answers

@pytest.mark.parametrize("text,seconds", [("1-02:03:04", 93784), ("02:03:04", 7384),
                                          ("03:04", 184), ("UNLIMITED", None),
                                          ("NOT_SET", None)])
def test_slurm_time_left_is_parsed(text, seconds):
    assert slurm.parse_duration(text) == seconds


def test_squeue_then_scontrol_for_a_job_squeue_forgot(standins):
    standins.add("squeue", "RUNNING|05:00|c2\n")
    assert schedulers.query("slurm", "8") == schedulers.QueueState("RUNNING", 300, "c2")
    standins.add("squeue", "slurm_load_jobs error: Invalid job id specified\n", code=1)
    standins.add("scontrol", "JobId=8 JobName=x JobState=COMPLETED NodeList=c2 Reason=None\n")
    assert schedulers.query("slurm", "8") == schedulers.QueueState("COMPLETED", None, "c2")
    standins.add("scontrol", "", code=1)
    assert schedulers.query("slurm", "8") == schedulers.QueueState("UNKNOWN", None, "")


def test_torque_qstat_without_stime_uses_its_own_remaining_walltime():
    torque = ("Job Id: 548.moab\n    job_state = R\n    exec_host = n003/0-1\n"
              "    Resource_List.walltime = 01:00:00\n    Walltime.Remaining = 3593\n")
    assert pbs.state_of(pbs.parse_qstat(torque)) == schedulers.QueueState(
        "RUNNING", 3593, "n003", None)
    used = ("Job Id: 9.srv\n    job_state = R\n    Resource_List.walltime = 100:00:00\n"
            "    resources_used.walltime = 99:30:00\n")
    assert pbs.state_of(pbs.parse_qstat(used)).time_left == 1800


def test_qstat_continuation_lines_are_joined_and_the_next_job_ignored():
    text = ("Job Id: 1.s\n    Variable_List = A=1,B=2\n\t,C=3\n    job_state = Q\n"
            "Job Id: 2.s\n    job_state = R\n")
    assert pbs.parse_qstat(text) == {"Variable_List": "A=1,B=2,C=3", "job_state": "Q"}
    assert pbs.state_of(pbs.parse_qstat(text)) == schedulers.QueueState("PENDING", None, "")


@pytest.mark.parametrize("text,size", [("4gb", 4 * 2**30), ("2048mb", 2**31),
                                       ("1048576kb", 2**30), ("512", 512), ("lots", None)])
def test_pbs_sizes(text, size):
    assert pbs.parse_size(text) == size


@pytest.mark.parametrize("text,seconds", [("01:02:03 L", 3723), ("0:05 L", 300),
                                          ("-", None), ("", None)])
def test_lsf_time_left(text, seconds):
    assert lsf.parse_time_left(text) == seconds


def test_bjobs_names_the_first_host_and_a_forgotten_job_is_unknown():
    assert lsf.parse_bjobs("RUN|4*hostA:2*hostB|00:10:00 L\n") == schedulers.QueueState(
        "RUNNING", 600, "hostA")
    assert lsf.parse_bjobs("PEND|-|-\n") == schedulers.QueueState("PENDING", None, "")
    assert lsf.parse_bjobs("Job <5> is not found\n") == schedulers.QueueState(
        "UNKNOWN", None, "")


def test_bsub_s_answer_names_the_job():
    assert lsf.job_id_from("Job <4242> is submitted to queue <normal>.\n") == "4242"
    assert lsf.job_id_from("Job <77[3]> is submitted to queue <long>.\n") == "77[3]"


# Command lines for serve jobs and their successors

@pytest.fixture
def home(tmp_path) -> Home:
    return Home(tmp_path / "home")


def test_serve_jobs_carry_the_home_and_the_script(home):
    script = Path("/opt/pgjob-serve.sh")
    argv = slurm.sbatch_argv(home, ("--time=1:00:00",), script)
    assert argv[:2] == ["sbatch", "--parsable"]
    assert argv[-3:] == ["--time=1:00:00", str(script), str(home.path)]  # user's options last
    argv = pbs.qsub_argv(home, ("-q", "long"), Path("/opt/pgjob-serve.pbs"))
    variables = dict(v.split("=", 1) for v in argv[argv.index("-v") + 1].split(","))
    assert variables["PGJOB_HOME"] == str(home.path)
    assert variables["PGJOB_SCRIPT"] == "/opt/pgjob-serve.pbs"
    assert argv[-3:] == ["-q", "long", "/opt/pgjob-serve.pbs"]
    assert lsf.bsub_argv(home, ("-q", "long")) == [
        "bsub", "-o", f"{home.logs}/serve-%J.out", "-q", "long"]


def test_a_slurm_successor_keeps_the_job_s_resources_and_waits_for_it(home):
    shown = slurm.parse_show(
        "JobId=10 JobName=pgjob-serve TimeLimit=02:00:00 Partition=debug Account=(null) "
        "QOS=normal WorkDir=/work MinMemoryNode=4G NumCPUs=2 "
        "StdOut=/work/logs/serve-10.out Command=/work/pgjob-serve.sh")
    argv = slurm.successor_argv(home, "10", shown)
    assert argv[:3] == ["sbatch", "--parsable", "--dependency=afterany:10"]
    assert {"--job-name=pgjob-serve", "--time=02:00:00", "--partition=debug",
            "--qos=normal", "--chdir=/work", "--mem=4G", "--cpus-per-task=2",
            "--output=/work/logs/serve-%j.out"} <= set(argv)
    assert not any(a.startswith("--account") for a in argv)  # (null) is not carried
    assert argv[-2:] == ["/work/pgjob-serve.sh", str(home.path)]


def test_a_slurm_successor_s_log_keeps_folders_that_hold_the_job_s_digits(home):
    shown = {"StdOut": "/tmp/pytest-6/run6/serve-6.out", "Command": "/s.sh"}
    assert "--output=/tmp/pytest-6/run6/serve-%j.out" in slurm.successor_argv(home, "6", shown)


def test_a_pbs_successor_keeps_pbs_pro_s_select_or_torque_s_nodes_never_both():
    exports = {"PGJOB_HOME": "/h"}
    pro = {"Job_Name": "pgjob-serve", "queue": "workq", "Resource_List.walltime": "01:00:00",
           "Resource_List.select": "1:ncpus=2:mem=2gb", "Resource_List.mem": "2gb",
           "Output_Path": "login1:/h/logs/pgjob-serve.o1"}
    argv = pbs.successor_argv("1.s", pro, Path("/s.pbs"), exports)
    assert argv[:5] == ["qsub", "-V", "-W", "depend=afterany:1.s", "-v"]
    assert "select=1:ncpus=2:mem=2gb" in argv and "mem=2gb" not in argv
    assert argv[argv.index("-N"):][:4] == ["-N", "pgjob-serve", "-q", "workq"]
    assert argv[-5:] == ["-j", "oe", "-o", "/h/logs/", "/s.pbs"]  # logs beside the last
    torque = {"Resource_List.nodes": "1:ppn=2", "Resource_List.mem": "2gb"}
    argv = pbs.successor_argv("2.t", torque, Path("/s.pbs"), exports)
    assert "nodes=1:ppn=2" in argv and "mem=2gb" in argv
    assert not any(a.startswith("select=") for a in argv)


def test_an_lsf_successor_waits_for_the_job_in_its_queue_under_its_name(tmp_path):
    argv = lsf.successor_argv("4242", tmp_path, {"LSB_QUEUE": "long", "LSB_JOBNAME": "srv"})
    assert argv == ["bsub", "-w", "ended(4242)", "-o", f"{tmp_path}/serve-%J.out",
                    "-q", "long", "-J", "srv"]
    assert lsf.successor_argv("1", tmp_path, {})[-2:] == ["-o", f"{tmp_path}/serve-%J.out"]


def test_every_batch_system_ships_its_serve_script():
    for found in schedulers.BATCH:
        assert found.serve_script().is_file(), found.name


# The registry

def test_the_submit_order_is_slurm_lsf_pbs():
    assert [found.name for found in schedulers.BATCH] == ["slurm", "lsf", "pbs"]
    assert [found.submit_command for found in schedulers.BATCH] == ["sbatch", "bsub", "qsub"]
    assert [found.cancel_command for found in schedulers.BATCH] == ["scancel", "bkill", "qdel"]


def test_submit_takes_the_first_batch_system_on_path(standins):
    for command in ("qsub", "bsub"):
        standins.add(command)
    assert submission.choose_scheduler().name == "lsf"
    standins.add("sbatch")  # a Slurm site with a qsub wrapper: sbatch wins
    assert submission.choose_scheduler().name == "slurm"
    assert submission.choose_scheduler("pbs").name == "pbs"
    with pytest.raises(UsageError, match="choose one of slurm, lsf, pbs"):
        submission.choose_scheduler("none")


def test_get_knows_each_scheduler_by_name_and_refuses_others():
    for name in ("slurm", "lsf", "pbs", "none"):
        assert schedulers.get(name).name == name
    assert isinstance(schedulers.get("none"), base.Scheduler)
    with pytest.raises(UsageError, match="unknown scheduler 'cobalt'"):
        schedulers.get("cobalt")


def test_query_asks_nobody_without_a_scheduler_or_a_job_id(standins):
    standins.add("squeue", "RUNNING|05:00|c2\n")
    assert schedulers.query("none", "7") is None
    assert schedulers.query("cobalt", "7") is None  # from a record: not an error
    assert schedulers.query("slurm", "") is None
    assert standins.calls("squeue") == []
