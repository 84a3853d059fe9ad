"""What the batch system tells a job about itself: which scheduler, job id, node, memory, end.

Facts come from per-scheduler tables of environment variables; `detect()` says which
scheduler is active. Memory also comes from the cgroup the job runs in.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

MB = 1024 * 1024

# scheduler -> (variable that proves it is active, job id variable, node name variable)
TABLES = {
    "slurm": ("SLURM_JOB_ID", "SLURM_JOB_ID", "SLURMD_NODENAME"),
    "pbs": ("PBS_JOBID", "PBS_JOBID", ""),
    "lsf": ("LSB_JOBID", "LSB_JOBID", ""),
}


@dataclass(frozen=True)
class Job:
    scheduler: str  # "slurm", "pbs", "lsf" or "none"
    job_id: str
    node: str
    memory_bytes: int  # what this job may really use
    end_time: float | None  # epoch seconds, when the scheduler says

    def time_left(self, now: float | None = None) -> float | None:
        if self.end_time is None:
            return None
        return max(0.0, self.end_time - (now or time.time()))


def detect(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    for name, (marker, _, _) in TABLES.items():
        if env.get(marker):
            return name
    return "none"


def _slurm_memory(env: dict[str, str]) -> int | None:
    if env.get("SLURM_MEM_PER_NODE"):
        return int(env["SLURM_MEM_PER_NODE"]) * MB
    if env.get("SLURM_MEM_PER_CPU"):
        cpus = env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_JOB_CPUS_PER_NODE", "1")
        return int(env["SLURM_MEM_PER_CPU"]) * int(cpus.split("(")[0].split(",")[0]) * MB
    return None


def cgroup_memory(proc_cgroup: Path = Path("/proc/self/cgroup"),
                  root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of our cgroup (v2 or v1), or None when unlimited or unknown."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidate = root / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            candidate = root / "memory" / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            raw = candidate.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 2**60:
            return int(raw)
    return None


def node_name(env: dict[str, str] | None = None) -> str:
    """This node's name as the scheduler knows it, else the short host name. Cheap: it is
    what the lease and the serve record compare, in polling loops."""
    env = os.environ if env is None else env
    name = detect(env)
    node_var = TABLES[name][2] if name != "none" else ""
    return (env.get(node_var, "") if node_var else "") or socket.gethostname().split(".")[0]


def current(env: dict[str, str] | None = None) -> Job:
    """This process's job, or a job of scheduler "none" outside any batch system."""
    env = dict(os.environ if env is None else env)
    name = detect(env)
    node = node_name(env)
    job_id = env.get(TABLES[name][1], "") if name != "none" else ""
    limits = [psutil.virtual_memory().total, cgroup_memory()]
    if name == "slurm":
        limits.append(_slurm_memory(env))
    end = env.get("SLURM_JOB_END_TIME") if name == "slurm" else None
    return Job(scheduler=name, job_id=job_id, node=node,
               memory_bytes=min(m for m in limits if m),
               end_time=float(end) if end and end.isdigit() else None)


@dataclass(frozen=True)
class QueueState:
    """What the scheduler says now about a job: state, time left, node."""

    state: str  # RUNNING, PENDING, COMPLETED, ... or "UNKNOWN" when the scheduler forgot it
    time_left: float | None
    node: str


def parse_slurm_duration(text: str) -> float | None:
    """Seconds in Slurm's [days-]hours:minutes:seconds (or minutes:seconds) form."""
    text = text.strip()
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = rest.split(":")
    if not days.isdigit() or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None  # UNLIMITED, NOT_SET, INVALID
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return int(days) * 86400 + seconds


def query(scheduler: str, job_id: str) -> QueueState | None:
    """Ask the scheduler about a job; None when we cannot ask (not Slurm, no squeue)."""
    from . import proc
    from .errors import CommandFailed

    if scheduler != "slurm" or not job_id:
        return None
    try:
        out = proc.run(["squeue", "-h", "-j", job_id, "-o", "%T|%L|%N"], timeout=20,
                       what="squeue failed")
    except CommandFailed:
        out = ""  # squeue says "Invalid job id" once the job has left its memory
    if "|" in out:
        state, left, node = out.strip().splitlines()[0].split("|", 2)
        return QueueState(state, parse_slurm_duration(left), node)
    try:
        shown = proc.run(["scontrol", "show", "job", "-o", job_id], timeout=20,
                         what="scontrol failed")
    except CommandFailed:
        return QueueState("UNKNOWN", None, "")
    fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
    return QueueState(fields.get("JobState", "UNKNOWN"), None, fields.get("NodeList", ""))
