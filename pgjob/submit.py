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
