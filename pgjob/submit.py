"""`pgjob submit`: the serve job script handed to sbatch for this home."""
from __future__ import annotations

import json
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

from . import proc
from .errors import PgJobError
from .home import Home

SCRIPT = "pgjob-serve.sh"


def serve_script() -> Path:
    path = Path(str(resources.files("pgjob.jobscripts") / SCRIPT))
    if not path.is_file():
        raise PgJobError(f"the job script {SCRIPT} is missing from this pgjob installation "
                         f"({path}); reinstall pgjob, or `sbatch jobscripts/{SCRIPT}` by hand")
    return path


def own_command() -> str:
    """The pgjob executable beside this Python, so the job runs the same pgjob."""
    beside = Path(sys.executable).parent / "pgjob"
    return str(beside) if beside.exists() else (shutil.which("pgjob") or "pgjob")


def sbatch_argv(home: Home, extra: tuple[str, ...], script: Path) -> list[str]:
    # Our defaults come first: sbatch lets a later option override an earlier one.
    return ["sbatch", "--parsable", f"--export=ALL,PGJOB_HOME={home.path},PGJOB={own_command()}",
            f"--output={home.logs}/serve-%j.out", *extra, str(script), str(home.path)]


def submit(home: Home, extra: tuple[str, ...]) -> str:
    """Submit the serve job and return its id; remembered in the home for `status`."""
    if shutil.which("sbatch") is None:
        raise PgJobError("sbatch is not on PATH: `pgjob submit` needs Slurm. On another "
                         "scheduler, submit a job that runs `pgjob serve`")
    out = proc.run(sbatch_argv(home, extra, serve_script()), timeout=60,
                   what="sbatch refused the serve job")
    job_id = out.strip().splitlines()[-1].split(";")[0]
    home.write(home.submitted,
               json.dumps({"job_id": job_id, "scheduler": "slurm",
                           "submitted_at": time.time()}) + "\n")
    return job_id


def successor_argv(home: Home, job_id: str, shown: dict[str, str]) -> list[str]:
    """sbatch for the job that takes over from `job_id`: same script, same resources, any
    node, starting once `job_id` has ended (its #SBATCH lines are read again by sbatch)."""
    argv = ["sbatch", "--parsable", f"--dependency=afterany:{job_id}",
            f"--export=ALL,PGJOB_HOME={home.path},PGJOB={own_command()}"]
    carried = {"JobName": "--job-name", "TimeLimit": "--time", "Partition": "--partition",
               "Account": "--account", "QOS": "--qos", "WorkDir": "--chdir"}
    for field, option in carried.items():
        value = shown.get(field, "")
        if value and value not in ("(null)", "UNLIMITED", "Partition_Limit"):
            argv.append(f"{option}={value}")
    if shown.get("MinMemoryNode"):
        argv.append(f"--mem={shown['MinMemoryNode']}")
    elif shown.get("MinMemoryCPU"):
        argv.append(f"--mem-per-cpu={shown['MinMemoryCPU']}")
    if shown.get("NumCPUs", "").isdigit():
        argv.append(f"--cpus-per-task={shown['NumCPUs']}")
    if shown.get("StdOut"):
        argv.append(f"--output={shown['StdOut'].replace(job_id, '%j')}")
    argv += [shown["Command"], str(home.path)]
    return argv


def submit_successor(home: Home, job_id: str) -> str:
    """Queue the next serve job of a renewal chain; remembered in the home."""
    out = proc.run(["scontrol", "show", "job", "-o", job_id], timeout=30,
                   what=f"scontrol could not show job {job_id}")
    shown = dict(f.split("=", 1) for f in out.split() if "=" in f)
    if not shown.get("Command") or not Path(shown["Command"]).is_file():
        raise PgJobError(f"cannot renew job {job_id}: its script ({shown.get('Command')}) "
                         "is not a file that a new job could run")
    new = proc.run(successor_argv(home, job_id, shown), timeout=60,
                   what="sbatch refused the next serve job").strip().splitlines()[-1]
    new = new.split(";")[0]
    home.write(home.successor, json.dumps({"job_id": new, "after": job_id}) + "\n")
    return new


def cancel_successor(home: Home) -> str | None:
    """End a renewal chain: cancel the queued next serve job, if any."""
    try:
        record = json.loads(home.successor.read_text())
    except (OSError, ValueError):
        return None
    home.successor.unlink(missing_ok=True)
    try:
        proc.run(["scancel", record["job_id"]], timeout=30, what="scancel failed")
    except PgJobError:
        return None
    return record["job_id"]
