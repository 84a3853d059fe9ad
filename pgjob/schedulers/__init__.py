"""The batch systems pgjob knows, one module each, and which one this process runs under.

`detect()` names the active scheduler from the job's environment (submitit's pattern),
`get()` gives its `Scheduler`; `current()`, `node_name()` and `query()` are the questions
the rest of pgjob asks, whatever the scheduler.
"""
from __future__ import annotations

import os

from ..errors import UsageError
from .base import Env, Job, QueueState, Resources, Scheduler, Table, cgroup_memory
from .lsf import Lsf
from .none import NoScheduler
from .pbs import Pbs
from .slurm import Slurm

__all__ = ["BATCH", "NONE", "Job", "QueueState", "Resources", "Scheduler", "Table", "cgroup_memory",
           "current", "detect", "get", "node_name", "query", "restarts"]

# The batch systems, in the order `pgjob submit` tries their submit commands: Slurm sites
# often install a qsub wrapper too, so sbatch must win.
BATCH: tuple[Scheduler, ...] = (Slurm(), Lsf(), Pbs())
NONE = NoScheduler()
_BY_NAME = {found.name: found for found in (*BATCH, NONE)}


def get(name: str) -> Scheduler:
    """The scheduler called `name` ("slurm", "lsf", "pbs" or "none")."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UsageError(f"unknown scheduler {name!r}; choose one of "
                         f"{', '.join(found.name for found in BATCH)}") from None


def detect(env: Env | None = None) -> str:
    """The name of the scheduler whose job this is, or "none"."""
    env = os.environ if env is None else env
    return next((found.name for found in BATCH if found.active(env)), NONE.name)


def current(env: Env | None = None) -> Job:
    """This process's job, or a job of scheduler "none" outside any batch system. Its end
    comes from the job's environment where the scheduler puts it there (Slurm), else from
    the scheduler's queue (squeue, qstat, bjobs)."""
    env = dict(os.environ if env is None else env)
    return get(detect(env)).current(env)


def node_name(env: Env | None = None) -> str:
    """This node's name as the scheduler knows it, else the short host name."""
    env = os.environ if env is None else env
    return get(detect(env)).node_name(env)


def query(name: str, job_id: str) -> QueueState | None:
    """Ask scheduler `name` about a job; None when we cannot ask (no such scheduler, none,
    no job id). `name` and `job_id` may come from a record others can write: an unknown
    name is not an error."""
    found = _BY_NAME.get(name)
    return found.query(job_id) if found is not None and job_id else None


def restarts(name: str, job_id: str) -> int | None:
    """How many times scheduler `name` has started a job again under its id (a requeue);
    None when it cannot tell. Like `query`, safe for names and ids read from a record."""
    found = _BY_NAME.get(name)
    return found.restarts(job_id) if found is not None and job_id else None
