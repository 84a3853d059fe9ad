"""The tools users already launch studies with, for real on the Slurm test cluster
(docs/integrations.md): a Hydra sweep launched by submitit, submitit's own executor with a
requeued job, and a framework (MALA's way) that builds a plain RDBStorage itself.

Each tool runs from a venv of its own under /var/tmp/pgjob-optuna-venvs, built with pip
once by test_optuna_versions' helper and kept (about 15 s each the first time with pip's
index at hand): the Hydra one has no pgjob in it, as a user's sweep environment need not;
the submitit one has pgjob's own requirements and reaches this checkout's pgjob through
PYTHONPATH. The host stands in for the login node, where a Hydra driver or a submitit
script runs; their jobs run on the nodes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import set_settings, trial_states
from pgjob.initialize import init
from pgjob.waiting import until
from test_optuna_versions import VENVS, Client, _build, client_env
from test_slurm import FINISHED, REPO, Slurm, published, requeued, serve_job

pytestmark = [pytest.mark.cluster, pytest.mark.pg, pytest.mark.slow]

APPS = Path(__file__).resolve().parent / "integrations"
# What pip gives a user who asks for the sweeper and the launcher, plus three pins they do
# not make themselves (docs/integrations.md): the plugins ask for hydra-core>=1.1.0.dev7, a
# pre-release in the specifier, so pip takes Hydra's newest pre-release (1.4.0rc3 when this
# was written), which no longer instantiates the sweeper's sampler; the sweeper pins Optuna
# 2.10, whose own SQLAlchemy requirement has no upper bound, so pip brings SQLAlchemy 2.x,
# which Optuna 2.10 cannot run on; and nothing brings a PostgreSQL driver (SQLAlchemy 1.4
# reads postgresql:// as psycopg2).
HYDRA = Client("hydra-sweeper", "2.10.1", ("hydra-optuna-sweeper", "hydra-submitit-launcher",
                                           "hydra-core<1.4", "sqlalchemy<2",
                                           "psycopg2-binary"),
               "postgresql", "psycopg2")
PGJOB_REQUIREMENTS = tuple(tomllib.loads((REPO / "pyproject.toml").read_text())
                           ["project"]["dependencies"])
SUBMITIT = Client("submitit", "", ("submitit", *PGJOB_REQUIREMENTS), "postgresql+psycopg",
                  "psycopg")
# Heartbeats every second, a trial judged after 10 s; serve sweeps every 5 s.
FAST = {"heartbeat_interval": 2, "grace_period": 10}


@pytest.fixture(scope="module")
def venvs() -> dict[str, Path]:
    VENVS.mkdir(mode=0o755, parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        built = dict(zip(("hydra", "submitit"), pool.map(_build, (HYDRA, SUBMITIT))))
    for name, (venv, seconds) in built.items():
        print(f"{name}: {venv} " + (f"built in {seconds:.1f} s" if seconds else "kept"))
    return {name: venv for name, (venv, _) in built.items()}


@pytest.fixture(scope="module")
def slurm(cluster, tmp_path_factory):
    jobs = Slurm(tmp_path_factory.mktemp("integrations"))
    yield jobs
    jobs.cancel_all()


def serve_home(slurm: Slurm, path: Path, node: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    init(path, workers=16)
    set_settings(path, **FAST)
    serve_job(slurm, path, node)
    return path


@pytest.fixture(scope="module")
def homes(slurm, venvs) -> dict[str, Path]:
    """Two homes served at once: Hydra's Optuna 2.10 makes tables of its own schema, which
    the current Optuna of the others cannot share (docs/guide.md, Which Optuna versions).
    The Hydra home's folder name has a space, ?, & and = in it, which its URL encodes."""
    return {"hydra": serve_home(slurm, slurm.workdir / "hydra" / "home ?a=1&b=2", "node1"),
            "current": serve_home(slurm, slurm.workdir / "current" / "home", "node2")}


def pgjob_on_path(folder: Path) -> str:
    """A folder with a `pgjob` command (this checkout's, as an installed one would be),
    for the shell one-liners a user types."""
    folder.mkdir(exist_ok=True)
    wrapper = folder / "pgjob"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m pgjob \"$@\"\n")
    wrapper.chmod(0o755)
    return str(folder)


def test_a_hydra_sweep_launched_by_submitit_stores_its_trials_in_pgjob(slurm, venvs, homes):
    home = homes["hydra"]
    found = published(home)
    app = slurm.workdir / "hydra-app"
    shutil.copytree(APPS / "hydra_app", app)
    bindir = pgjob_on_path(slurm.workdir / "bin")
    override = subprocess.run([f"{bindir}/pgjob", "url", "--home", str(home), "--format",
                               "hydra"], capture_output=True, text=True, check=True).stdout
    assert override.startswith("hydra.sweeper.storage='postgresql://")
    assert "%20%3Fa%3D1%26b%3D2/secrets/app.pgpass&sslmode=verify-full&sslrootcert=" in override

    env = {**client_env(), "PATH": f"{venvs['hydra']}/bin:{bindir}:{os.environ['PATH']}",
           "PGJOB_HOME": str(home), "SWEEP_DIR": str(slurm.workdir / "sweep")}
    started = time.monotonic()
    # the line a user types on the login node
    done = subprocess.run(
        ["bash", "-c", 'python sweep.py --multirun "$(pgjob url --format hydra --wait 60)"'],
        cwd=app, env=env, capture_output=True, text=True, timeout=420)
    print(f"hydra sweep: {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Best parameters" in done.stdout + done.stderr, done.stdout + done.stderr

    assert trial_states(found, "hydra-sweep") == {"COMPLETE": 4}
    nodes = {p.read_text() for p in (slurm.workdir / "sweep").glob("*/node.txt")}
    assert nodes and nodes <= {"node1", "node2", "node3"}, nodes
    status = json.loads(subprocess.run([f"{bindir}/pgjob", "status", "--home", str(home),
                                        "--json"], capture_output=True, text=True).stdout)
    assert status["optuna_schema"]["library_version"] == "2.10.1"


def test_submitit_workers_lose_no_trial_when_submitit_requeues_a_preempted_job(
        slurm, venvs, homes):
    home = homes["current"]
    found = published(home)
    folder = slurm.workdir / "submitit"
    folder.mkdir()
    env = {**os.environ, "PGJOB_HOME": str(home), "PYTHONPATH": str(REPO)}
    errors = folder / "driver.err"
    driver = subprocess.Popen(
        [str(venvs["submitit"] / "bin" / "python"), str(APPS / "submitit_workers.py"),
         str(folder), "submitit-study", "12", "1.5", "2"],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=open(errors, "w"), text=True)
    try:
        assert until(lambda: (folder / "jobs.json").exists() or driver.poll() is not None,
                     60) and driver.poll() is None, errors.read_text()
        jobs = json.loads((folder / "jobs.json").read_text())
        slurm.jobs.extend(jobs)
        victim = jobs[0]

        def victim_running_a_trial() -> bool:
            with found.connect() as conn:
                return conn.execute(
                    "select count(*) from pgjob_heartbeats h join trials t using (trial_id) "
                    "where t.state = 'RUNNING' and h.job = %s", (f"slurm:{victim}@0",)
                ).fetchone()[0] == 1 if trial_states(found, "submitit-study").get(
                    "COMPLETE", 0) >= 2 else False

        assert until(victim_running_a_trial, 120, 0.3), trial_states(found, "submitit-study")
        # what Slurm does to a preempted job, as submitit's own tests do it: SIGTERM
        # (submitit lets it pass), then the signal submitit checkpoints and requeues on
        for signal in ("SIGTERM", "USR2"):
            subprocess.run(["scancel", "--signal", signal, victim], check=True, timeout=30)
        assert until(lambda: requeued(victim) >= 1, 60), requeued(victim)
        # Slurm holds a requeued job back (BeginTime, about two minutes); meanwhile the
        # server's sweep has failed the cut-short trial and queued its retry
        slurm.wait_state(victim, {"PENDING"}, 60)  # after COMPLETING
        assert until(lambda: trial_states(found, "submitit-study").get("FAIL") == 1, 30), \
            trial_states(found, "submitit-study")
        # the user does not wait the hold out (nor does the test)
        subprocess.run(["scontrol", "update", f"jobid={victim}", "StartTime=now"], check=True,
                       timeout=30)
        out, _ = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out + errors.read_text()
    # submitit hands back a result once the job has written it; the job itself ends a moment
    # later, so the test waits for that rather than racing it
    for job in jobs:
        slurm.wait_state(job, FINISHED | {"UNKNOWN"}, 60)
    states = trial_states(found, "submitit-study")
    print("submitit: trials", states, "results", out.strip().splitlines()[-1])
    # the preempted worker's trial was failed and retried; nothing is left RUNNING or WAITING
    assert states.get("FAIL") == 1 and states.get("COMPLETE", 0) >= 12, states
    assert set(states) == {"COMPLETE", "FAIL"}, states
    log = "\n".join(p.read_text() for p in folder.glob("*/*_log.err"))
    assert "Requeued job" in log or "requeue" in log.lower(), log[-3000:]


def test_a_framework_s_own_rdbstorage_leaves_zombies_only_its_requeue_step_clears(
        slurm, venvs, homes):
    """MALA's way: the framework builds RDBStorage(url=..., heartbeat_interval=...) from
    the URL string. Such a client declares no pgjob heartbeat, so the server leaves its
    trials to Optuna's own heartbeat, which only a running worker of the study acts on: a
    killed job's trial stays RUNNING until the documented clean-up step re-queues it."""
    home = homes["current"]
    found = published(home)
    url = subprocess.run([sys.executable, "-m", "pgjob", "url", "--home", str(home)],
                         capture_output=True, text=True, check=True).stdout.strip()
    python = str(venvs["submitit"] / "bin" / "python")
    script = str(APPS / "mala_style.py")
    worker = slurm.sbatch("-w", "node3", "--mem=500M", f"--output={slurm.workdir}/mala-%j.out",
                          "--wrap", f"{python} {script} '{url}' mala-study 6 600",
                          env=client_env())
    assert until(lambda: trial_states(found, "mala-study") == {"RUNNING": 1}, 90)
    subprocess.run(["scancel", worker], check=True, timeout=30)
    slurm.wait_state(worker, FINISHED, 60)
    time.sleep(15)  # longer than Optuna's grace (6 s) and pgjob's (10 s), a sweep or more
    assert trial_states(found, "mala-study") == {"RUNNING": 1}  # a zombie

    cleaned = subprocess.run([python, script, url, "mala-study", "--requeue-zombies"],
                             capture_output=True, text=True, env=client_env(), timeout=60)
    assert cleaned.returncode == 0 and "requeued [0]" in cleaned.stdout, cleaned.stderr
    again = slurm.sbatch("-w", "node3", "--mem=500M", f"--output={slurm.workdir}/mala-%j.out",
                         "--wrap", f"{python} {script} '{url}' mala-study 3 0.2",
                         env=client_env())
    assert slurm.wait_state(again, FINISHED, 120) == "COMPLETED"
    assert trial_states(found, "mala-study") == {"COMPLETE": 3}
