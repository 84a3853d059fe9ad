"""pgjob's Python API as a driver script uses it: the job previewed, submitted to the real
Slurm test cluster and handled (url, status, state, stop), attached to again, and the
server run for the length of a `with` block inside one allocation."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import optuna
import pytest

import pgjob
from pgjob import binaries, endpoint
from pgjob.cluster import cluster_state
from pgjob.errors import UsageError
from pgjob.home import open_home
from pgjob.initialize import init
from pgjob.waiting import until

FINISHED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "UNKNOWN"}


def controldata_state(home: Path) -> str:
    return cluster_state(binaries.find(open_home(home).settings().pg_bin), home / "data")


def three_trials(url: str, name: str) -> dict:
    study = optuna.create_study(storage=url, study_name=name, load_if_exists=True)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    return {state.name: n for state, n in _count(study).items()}


def _count(study) -> dict:
    counts: dict = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] = counts.get(trial.state, 0) + 1
    return counts


@pytest.mark.pg
def test_serving_runs_the_server_for_the_block_and_stops_it_cleanly(home_path, tmp_path):
    log = tmp_path / "serve.out"
    with pgjob.serving(home_path, host="127.0.0.1", log=log) as job:
        assert job.job_id == "" and job.scheduler == "none"
        assert three_trials(job.url(wait=60), "in-block") == {"COMPLETE": 3}
        assert job.status()["state"] == "healthy"
    assert endpoint.read(open_home(home_path)) is None  # withdrawn: no worker is sent there
    assert controldata_state(home_path) == "shut down", log.read_text()


@pytest.mark.pg
def test_a_serve_that_cannot_start_is_reported_with_its_log(home_path, tmp_path):
    log = tmp_path / "serve.out"
    with pytest.raises(pgjob.PgJobError, match="exited .* before it served") as caught:
        with pgjob.serving(home_path, host="203.0.113.7", log=log):  # not this machine's
            pass
    assert str(log) in str(caught.value) and log.read_text()


@pytest.mark.pg
def test_preview_shows_each_schedulers_command_and_script_and_submits_nothing(home_path):
    wanted = dict(walltime="08:00:00", memory="4GB", cores=2, queue="short", account="lab")
    slurm = pgjob.preview(home_path, scheduler="slurm", **wanted)
    assert slurm.argv[0] == "sbatch" and "--time=08:00:00" in slurm.argv
    assert {"--mem=4G", "--cpus-per-task=2", "--partition=short", "--account=lab"} <= set(
        slurm.argv)
    assert "#SBATCH" in str(slurm) and "pgjob" in slurm.script.read_text()
    pbs = pgjob.preview(home_path, scheduler="pbs", **wanted)
    assert "walltime=08:00:00" in pbs.argv and "select=1:ncpus=2:mem=4gb" in pbs.argv
    lsf = pgjob.preview(home_path, scheduler="lsf", **wanted)
    assert lsf.argv[0] == "bsub" and ["-W", "8:00"] == list(lsf.argv[lsf.argv.index("-W"):][:2])
    assert not open_home(home_path).submitted.exists()


@pytest.mark.pg
@pytest.mark.parametrize("bad", [dict(queue="--wrap=rm -rf ~"), dict(walltime="8h"),
                                 dict(memory="lots"), dict(cores=-1)])
def test_a_resource_that_would_change_the_submit_command_is_refused(home_path, bad):
    with pytest.raises(UsageError, match="refused"):
        pgjob.preview(home_path, scheduler="slurm", **bad)


@pytest.mark.cluster
@pytest.mark.pg
def test_submit_url_status_stop_on_the_slurm_cluster(cluster, tmp_path, monkeypatch):
    home = tmp_path / "home"
    init(home, workers=16)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    job = pgjob.submit(home, walltime="00:10:00", memory="1GB", job_name="pgjob-api",
                       extra=("-w", "node2"))
    try:
        assert job.scheduler == "slurm" and job.job_id.isdigit()
        url = job.url(wait=120)
        assert three_trials(url, "submitted") == {"COMPLETE": 3}
        assert job.status()["state"] == "healthy"
        assert job.state().state == "RUNNING" and job.state().node == "node2"
        assert pgjob.attach(home) == job
        report = job.stop(wait=90)
        assert report.stopped, report.message
        assert until(lambda: job.state().state in FINISHED, 60, 0.5)
        assert controldata_state(home) == "shut down"
        assert pgjob.attach(home).job_id == job.job_id  # from the record of the submission
    finally:
        os.system(f"scancel {job.job_id} >/dev/null 2>&1")
