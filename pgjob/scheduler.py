"""What the batch system tells a job about itself: which scheduler, job id, node, memory, end.

Facts come from per-scheduler tables of environment variables; `detect()` says which
scheduler is active. Memory also comes from the cgroup the job runs in. What only the
scheduler's own commands know (PBS's walltime, LSF's time left) comes from `query()`,
whose PBS and LSF halves live in pbs.py and lsf.py.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

MB = 1024 * 1024


@dataclass(frozen=True)
class Table:
    """Where one scheduler puts a job's facts in the job's environment."""

    marker: str  # set in every job of this scheduler: proves it is active
    job_id: str
    node_vars: tuple[str, ...] = ()  # the first word of the first one set names the node
    node_file: str = ""  # else: a variable naming a file whose first line names it
    # Whether the job is signalled before its time limit (Slurm's --signal, LSF's -wa).
    # Where not (PBS), serve stops itself a margin before the job's end.
    warns: bool = True


TABLES = {
    "slurm": Table("SLURM_JOB_ID", "SLURM_JOB_ID", node_vars=("SLURMD_NODENAME",)),
    "pbs": Table("PBS_JOBID", "PBS_JOBID", node_file="PBS_NODEFILE", warns=False),
    "lsf": Table("LSB_JOBID", "LSB_JOBID", node_vars=("LSB_HOSTS", "LSB_MCPU_HOSTS")),
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

    @property
    def warned_before_end(self) -> bool:
        """Whether the scheduler signals this job before its time limit."""
        return self.scheduler not in TABLES or TABLES[self.scheduler].warns


def detect(env: dict[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    for name, table in TABLES.items():
        if env.get(table.marker):
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


def _first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def node_name(env: dict[str, str] | None = None) -> str:
    """This node's name as the scheduler knows it, else the short host name. Cheap: it is
    what the lease and the serve record compare, in polling loops."""
    env = os.environ if env is None else env
    table = TABLES.get(detect(env))
    if table is not None:
        for var in table.node_vars:
            if env.get(var, "").split():
                return env[var].split()[0]
        if table.node_file and env.get(table.node_file):
            listed = _first_line(env[table.node_file])
            if listed:
                return listed.split(".")[0]
    return socket.gethostname().split(".")[0]


def current(env: dict[str, str] | None = None) -> Job:
    """This process's job, or a job of scheduler "none" outside any batch system.

    Under PBS and LSF this asks the scheduler (qstat, bjobs) for the job's end and memory,
    which their job environments do not carry."""
    env = dict(os.environ if env is None else env)
    name = detect(env)
    node = node_name(env)
    job_id = env.get(TABLES[name].job_id, "") if name != "none" else ""
    limits = [psutil.virtual_memory().total, cgroup_memory()]
    end_time = None
    if name == "slurm":
        limits.append(_slurm_memory(env))
        end = env.get("SLURM_JOB_END_TIME", "")
        end_time = float(end) if end.isdigit() else None
    elif name != "none":
        queued = query(name, job_id)
        if queued is not None:
            limits.append(queued.memory_bytes)
            if queued.time_left is not None:
                end_time = time.time() + queued.time_left
    return Job(scheduler=name, job_id=job_id, node=node,
               memory_bytes=min(m for m in limits if m), end_time=end_time)


@dataclass(frozen=True)
class QueueState:
    """What the scheduler says now about a job: state, time left, node."""

    state: str  # RUNNING, PENDING, COMPLETED, ... or "UNKNOWN" when the scheduler forgot it
    time_left: float | None
    node: str
    memory_bytes: int | None = None  # the job's memory limit, where only the scheduler knows it


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
    """Ask the scheduler about a job; None when we cannot ask (no scheduler, no job id)."""
    from . import lsf, pbs, proc
    from .errors import CommandFailed

    if not job_id or scheduler not in TABLES:
        return None
    if scheduler != "slurm":
        return {"pbs": pbs.query, "lsf": lsf.query}[scheduler](job_id)
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
