"""`pgjob submit`: the serve job script handed to sbatch, qsub or bsub for this home; and
the renewal chain's successor jobs."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

from . import lsf, pbs, proc
from .errors import PgJobError, UsageError
from .home import Home

# Per scheduler: the serve script, and the commands that submit and cancel a job. The
# order is the order `pgjob submit` tries them in: Slurm sites often install a qsub
# wrapper too, so sbatch must win.
SCRIPTS = {"slurm": "pgjob-serve.sh", "lsf": "pgjob-serve.lsf", "pbs": "pgjob-serve.pbs"}
SUBMIT = {"slurm": "sbatch", "lsf": "bsub", "pbs": "qsub"}
CANCEL = {"slurm": "scancel", "lsf": "bkill", "pbs": "qdel"}


def serve_script(scheduler: str = "slurm") -> Path:
    name = SCRIPTS[scheduler]
    path = Path(str(resources.files("pgjob.jobscripts") / name))
    if not path.is_file():
        raise PgJobError(f"the job script {name} is missing from this pgjob installation "
                         f"({path}); reinstall pgjob, or `{SUBMIT[scheduler]} "
                         f"jobscripts/{name}` by hand")
    return path


def choose_scheduler(wanted: str = "") -> str:
    """The scheduler to submit to: the one asked for, else the first whose submit command
    is on PATH."""
    if wanted:
        if wanted not in SUBMIT:
            raise UsageError(f"unknown scheduler {wanted!r}; choose one of {', '.join(SUBMIT)}")
        if shutil.which(SUBMIT[wanted]) is None:
            raise PgJobError(f"{SUBMIT[wanted]} is not on PATH, so pgjob cannot submit to "
                             f"{wanted} from here; load the scheduler's module or submit "
                             "from a login node")
        return wanted
    for name, command in SUBMIT.items():
        if shutil.which(command):
            return name
    raise PgJobError("none of sbatch, bsub, qsub is on PATH: `pgjob submit` needs Slurm, LSF "
                     "or PBS. Elsewhere, submit a job that runs `pgjob serve`")


def own_command() -> str:
    """The pgjob executable beside this Python, so the job runs the same pgjob."""
    beside = Path(sys.executable).parent / "pgjob"
    return str(beside) if beside.exists() else (shutil.which("pgjob") or "pgjob")


def sbatch_argv(home: Home, extra: tuple[str, ...], script: Path) -> list[str]:
    # Our defaults come first: sbatch lets a later option override an earlier one.
    return ["sbatch", "--parsable", f"--export=ALL,PGJOB_HOME={home.path},PGJOB={own_command()}",
            f"--output={home.logs}/serve-%j.out", *extra, str(script), str(home.path)]


def exports(home: Home, script: Path) -> dict[str, str]:
    """What the serve job must know: the home, the pgjob to run, and the script that its
    successors run again (qsub and bsub keep no path to the script they were given)."""
    return {"PGJOB_HOME": str(home.path), "PGJOB": own_command(), "PGJOB_SCRIPT": str(script)}


def qsub_argv(home: Home, extra: tuple[str, ...], script: Path) -> list[str]:
    # -o to a folder: PBS Pro names the log JOBID.OU in it. -V passes this environment
    # on (PATH to pgjob), as sbatch does by itself.
    variables = ",".join(f"{k}={v}" for k, v in exports(home, script).items())
    return ["qsub", "-V", "-v", variables, "-j", "oe", "-o", f"{home.logs}/", *extra,
            str(script)]


def bsub_argv(home: Home, extra: tuple[str, ...]) -> list[str]:
    # The script goes on standard input (see _bsub).
    return ["bsub", "-o", f"{home.logs}/serve-%J.out", *extra]


def submit(home: Home, extra: tuple[str, ...], scheduler: str = "") -> str:
    """Submit the serve job and return its id; remembered in the home for `status`."""
    name = choose_scheduler(scheduler)
    script = serve_script(name)
    what = f"{SUBMIT[name]} refused the serve job"
    if name == "slurm":
        out = proc.run(sbatch_argv(home, extra, script), timeout=60, what=what)
        job_id = out.strip().splitlines()[-1].split(";")[0]
    elif name == "pbs":
        out = proc.run(qsub_argv(home, extra, script), timeout=60, what=what)
        job_id = out.strip().splitlines()[-1]
    else:
        job_id = _bsub(bsub_argv(home, extra), home, script, what)
    home.write(home.submitted,
               json.dumps({"job_id": job_id, "scheduler": name,
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


def job_script(scheduler: str) -> Path:
    """The script this job runs, as `pgjob submit` named it; else the installed one."""
    named = os.environ.get("PGJOB_SCRIPT", "")
    return Path(named) if named and Path(named).is_file() else serve_script(scheduler)


def submit_successor(home: Home, job_id: str, scheduler: str = "slurm") -> str:
    """Queue the next serve job of a renewal chain; remembered in the home."""
    if scheduler == "pbs":
        new = _pbs_successor(home, job_id)
    elif scheduler == "lsf":
        new = _bsub(lsf.successor_argv(job_id, home.logs), home, job_script("lsf"),
                    "bsub refused the next serve job")
    else:
        new = _slurm_successor(home, job_id)
    home.write(home.successor, json.dumps({"job_id": new, "after": job_id,
                                           "scheduler": scheduler}) + "\n")
    return new


def _bsub(argv: list[str], home: Home, script: Path, what: str) -> str:
    """Submit `script` with bsub on its standard input; LSF passes the environment, with
    `exports`, on to the job. Returns the new job's id."""
    return lsf.job_id_from(proc.run(argv, timeout=60, what=what,
                                    stdin_text=script.read_text(),
                                    env={**os.environ, **exports(home, script)}))


def _pbs_successor(home: Home, job_id: str) -> str:
    fields = pbs.show(job_id)
    if not fields:
        raise PgJobError(f"cannot renew job {job_id}: `qstat -f {job_id}` shows nothing")
    script = job_script("pbs")
    argv = pbs.successor_argv(job_id, fields, script, exports(home, script))
    return proc.run(argv, timeout=60,
                    what="qsub refused the next serve job").strip().splitlines()[-1]


def _slurm_successor(home: Home, job_id: str) -> str:
    out = proc.run(["scontrol", "show", "job", "-o", job_id], timeout=30,
                   what=f"scontrol could not show job {job_id}")
    shown = dict(f.split("=", 1) for f in out.split() if "=" in f)
    if not shown.get("Command") or not Path(shown["Command"]).is_file():
        raise PgJobError(f"cannot renew job {job_id}: its script ({shown.get('Command')}) "
                         "is not a file that a new job could run")
    new = proc.run(successor_argv(home, job_id, shown), timeout=60,
                   what="sbatch refused the next serve job").strip().splitlines()[-1]
    return new.split(";")[0]


def cancel_successor(home: Home) -> str | None:
    """End a renewal chain: cancel the queued next serve job, if any."""
    try:
        record = json.loads(home.successor.read_text())
    except (OSError, ValueError):
        return None
    home.successor.unlink(missing_ok=True)
    cancel = CANCEL.get(record.get("scheduler", "slurm"), "scancel")
    try:
        proc.run([cancel, record["job_id"]], timeout=30, what=f"{cancel} failed")
    except PgJobError:
        return None
    return record["job_id"]
