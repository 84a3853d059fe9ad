"""`pgjob submit`: the serve job handed to sbatch, bsub or qsub for this home, and the
renewal chain's successor jobs. What each scheduler's commands look like lives in
pgjob/schedulers/; this module chooses the scheduler and keeps the home's records of what
was submitted (`submitted.json`, `successor.json`)."""
from __future__ import annotations

import shutil
import time

from . import schedulers
from .errors import PgJobError, UsageError
from .home import Home
from .schedulers import Scheduler


def choose_scheduler(wanted: str = "") -> Scheduler:
    """The scheduler to submit to: the one asked for, else the first whose submit command
    is on PATH (in `schedulers.BATCH`'s order)."""
    if wanted:
        names = [found.name for found in schedulers.BATCH]
        if wanted not in names:
            raise UsageError(f"unknown scheduler {wanted!r}; choose one of {', '.join(names)}")
        chosen = schedulers.get(wanted)
        if shutil.which(chosen.submit_command) is None:
            raise PgJobError(f"{chosen.submit_command} is not on PATH, so pgjob cannot submit "
                             f"to {wanted} from here; load the scheduler's module or submit "
                             "from a login node")
        return chosen
    for chosen in schedulers.BATCH:
        if shutil.which(chosen.submit_command):
            return chosen
    raise PgJobError("none of sbatch, bsub, qsub is on PATH: `pgjob submit` needs Slurm, LSF "
                     "or PBS. Elsewhere, submit a job that runs `pgjob serve`")


def submit(home: Home, extra: tuple[str, ...], scheduler: str = "") -> str:
    """Submit the serve job and return its id; remembered in the home for `status`."""
    chosen = choose_scheduler(scheduler)
    job_id = chosen.submit(home, extra)
    home.write_record(home.submitted, {"job_id": job_id, "scheduler": chosen.name,
                                       "submitted_at": time.time()})
    return job_id


def submit_successor(home: Home, job_id: str, scheduler: str = "slurm") -> str:
    """Queue the next serve job of a renewal chain; remembered in the home."""
    new = schedulers.get(scheduler).submit_successor(home, job_id)
    home.write_record(home.successor, {"job_id": new, "after": job_id,
                                       "scheduler": scheduler})
    return new


def cancel_successor(home: Home) -> str | None:
    """End a renewal chain: cancel the queued next serve job, if any."""
    record = home.read_record(home.successor)
    if not record:
        return None
    home.successor.unlink(missing_ok=True)
    job_id = record.get("job_id")
    if not job_id:
        return None
    try:
        schedulers.get(record.get("scheduler", "slurm")).cancel(job_id)
    except PgJobError:
        return None
    return job_id
