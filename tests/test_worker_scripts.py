"""The PBS and LSF worker job scripts, run as those schedulers would run them.

Neither scheduler runs here. The stand-in `qsub` and `bsub` of test_pbs_lsf take the
submission as a user types it and note what they were given; the test then runs that
script the way the scheduler would (bash, in the job's documented environment, in the
folder PBS or LSF starts it in), against a real `pgjob serve`. What the script does is
real: a real `pgjob url --wait`, a real objective filling a real study.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from conftest import trial_states
from test_pbs_lsf import Standins, pbs_env

REPO = Path(__file__).resolve().parent.parent
PBS_WORKER = REPO / "jobscripts" / "optuna-worker.pbs"
LSF_WORKER = REPO / "jobscripts" / "optuna-worker.lsf"
OBJECTIVE = REPO / "jobscripts" / "example_objective.py"


@pytest.fixture
def standins(tmp_path, monkeypatch) -> Standins:
    found = Standins(tmp_path / "bin")
    monkeypatch.setenv("PATH", found.path())
    return found


def job_env(home: Path, **variables: str) -> dict[str, str]:
    """A job's environment as -V / bsub pass it: the submitter's, with pgjob and its
    Python first on PATH (as an activated venv has them)."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "PYTHON": sys.executable,
            "PGJOB_HOME": str(home), **variables}


def run_job(script: str | Path, env: dict[str, str], cwd: Path, stdin: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    argv = ["bash", "-s"] if stdin is not None else ["bash", str(script)]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def test_the_worker_scripts_are_installed_with_pgjob():
    for name in ("optuna-worker.sh", "optuna-worker.pbs", "optuna-worker.lsf"):
        script = resources.files("pgjob.jobscripts") / name
        assert script.is_file(), name
        assert os.stat(str(script)).st_mode & stat.S_IXUSR, name


@pytest.mark.pg
def test_a_pbs_array_subjob_waits_for_the_server_then_runs_its_trials(
        standins, fast_server, tmp_path):
    standins.add("qsub", "1300[].pbs1\n")
    submit_dir = tmp_path / "project"
    submit_dir.mkdir()
    (submit_dir / "train.py").write_text(OBJECTIVE.read_text())
    variables = "OBJECTIVE=train.py,STUDY=pbs-workers,TRIALS=3,OBJECTIVE_ARGS=--sleep 0.1"
    subprocess.run(["qsub", "-J", "1-2", "-v", variables, str(PBS_WORKER)], check=True,
                   cwd=submit_dir, env={**os.environ, "PATH": standins.path()}, timeout=30)
    argv = standins.calls("qsub")[0]["argv"]
    script = Path(argv[-1])
    given = dict(v.split("=", 1) for v in argv[argv.index("-v") + 1].split(","))

    # PBS starts each subjob in the user's home folder, with PBS_O_WORKDIR set
    started_in = tmp_path / "userhome"
    started_in.mkdir()
    logs = []
    for index in ("1", "2"):
        job = {**pbs_env(tmp_path, f"1300[{index}].pbs1"), "PBS_O_WORKDIR": str(submit_dir),
               "PBS_ARRAY_INDEX": index}
        env = job_env(fast_server.home_path, **given, **job)
        done = run_job(script, env, started_in)
        assert done.returncode == 0, done.stdout + done.stderr
        logs.append(done.stdout)
    assert "subjob 2 of job 1300[2].pbs1 on" in logs[1]
    assert "server found; running 3 trials of train.py in study pbs-workers" in logs[0]
    assert trial_states(fast_server.endpoint(), "pbs-workers") == {"COMPLETE": 6}


@pytest.mark.pg
def test_an_lsf_array_element_runs_the_script_bsub_read_from_its_input(
        standins, fast_server, tmp_path):
    standins.add("bsub", "Job <5100> is submitted to default queue <normal>.\n")
    with open(LSF_WORKER) as script:
        subprocess.run(["bsub"], stdin=script, check=True, cwd=tmp_path, timeout=30,
                       env=job_env(fast_server.home_path, PATH=standins.path(),
                                   STUDY="lsf-workers", TRIALS="4"))
    call = standins.calls("bsub")[0]
    assert '#BSUB -J "optuna-worker[1-10]%5"' in call["stdin"]
    assert call["env"]["PGJOB_HOME"] == str(fast_server.home_path)

    # LSF runs the job in the folder bsub was called from, with the submitter's environment
    env = job_env(fast_server.home_path, STUDY="lsf-workers", TRIALS="4", LSB_JOBID="5100",
                  LSB_JOBINDEX="3", LSB_HOSTS="hostA", LSB_MCPU_HOSTS="hostA 1",
                  OBJECTIVE=str(OBJECTIVE))
    done = run_job("-", env, tmp_path, stdin=call["stdin"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "element 3 of job 5100 on hostA: waiting for the server" in done.stdout
    assert trial_states(fast_server.endpoint(), "lsf-workers") == {"COMPLETE": 4}


@pytest.mark.parametrize("script", [PBS_WORKER, LSF_WORKER], ids=["pbs", "lsf"])
def test_a_worker_with_no_server_gives_up_after_pgjob_wait_and_says_so(script, home_path,
                                                                      tmp_path):
    env = job_env(home_path, PGJOB_WAIT="2", OBJECTIVE=str(OBJECTIVE))
    done = run_job(script, env, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr  # pgjob url's "not published"
    assert "waiting for the server of" in done.stdout
    assert "server found" not in done.stdout and "Traceback" not in done.stderr
