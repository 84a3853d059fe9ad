"""What a batch job learns about itself, and the `Scheduler` that each batch system fills in.

A job's facts come from its scheduler's table of environment variables (`Table`); what only
the scheduler's own commands know (PBS's walltime, LSF's time left) from its queue query.
Memory also comes from the cgroup the job runs in. slurm.py, pbs.py, lsf.py and none.py
each subclass `Scheduler`; the registry in __init__.py says which one is active.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from .. import proc
from ..errors import PgJobError, UsageError

if TYPE_CHECKING:
    from ..home import Home

MB = 1024 * 1024
Env = Mapping[str, str]


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
    # How many times the job was requeued and started again under the same id (Slurm's
    # SLURM_RESTART_COUNT, unset in a job's first run); "" where the job is not told.
    restarts: str = ""


@dataclass(frozen=True)
class QueueState:
    """What the scheduler says now about a job: state, time left, node."""

    state: str  # RUNNING, PENDING, COMPLETED, ... or "UNKNOWN" when the scheduler forgot it
    time_left: float | None
    node: str
    memory_bytes: int | None = None  # the job's memory limit, where only the scheduler knows it

    def end_time(self, now: float | None = None) -> float | None:
        """When the job ends (epoch seconds), if the scheduler said how long it has left."""
        return None if self.time_left is None else (now or time.time()) + self.time_left


@dataclass(frozen=True)
class Job:
    scheduler: str  # "slurm", "pbs", "lsf" or "none"
    job_id: str
    node: str
    memory_bytes: int  # what this job may really use
    end_time: float | None  # epoch seconds, when the scheduler says
    warned_before_end: bool = True  # whether the scheduler signals the job before its limit

    def time_left(self, now: float | None = None) -> float | None:
        if self.end_time is None:
            return None
        return max(0.0, self.end_time - (now or time.time()))


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


def own_command() -> str:
    """The pgjob executable beside this Python, so the job runs the same pgjob."""
    beside = Path(sys.executable).parent / "pgjob"
    return str(beside) if beside.exists() else (shutil.which("pgjob") or "pgjob")


def exports(home: Home, script: Path) -> dict[str, str]:
    """What the serve job must know: the home, the pgjob to run, and the script that its
    successors run again (qsub and bsub keep no path to the script they were given)."""
    return {"PGJOB_HOME": str(home.path), "PGJOB": own_command(), "PGJOB_SCRIPT": str(script)}


WALLTIME = re.compile(r"(\d+:)?(\d+:)?\d+")  # [[hours:]minutes:]seconds, as all three take it
MEMORY = re.compile(r"(\d+)\s*([KMGT])B?", re.IGNORECASE)
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")


@dataclass(frozen=True)
class Resources:
    """What a serve job asks its scheduler for, checked once here: each value goes onto
    the submit command line, so none may look like another option."""

    walltime: str = ""  # "HH:MM:SS"
    memory: str = ""  # "4GB", "500MB"
    cores: int = 0
    queue: str = ""  # Slurm's partition, PBS's and LSF's queue
    account: str = ""  # Slurm's and PBS's account, LSF's project
    job_name: str = ""

    def __post_init__(self) -> None:
        if self.walltime and not WALLTIME.fullmatch(self.walltime):
            raise UsageError(f"walltime {self.walltime!r} is refused: write it as "
                             "HH:MM:SS, e.g. walltime=\"08:00:00\"")
        if self.memory and not MEMORY.fullmatch(self.memory):
            raise UsageError(f"memory {self.memory!r} is refused: write a whole number and "
                             "a unit, e.g. memory=\"4GB\" or \"500MB\"")
        if not isinstance(self.cores, int) or isinstance(self.cores, bool) or not (
                0 <= self.cores <= 4096):
            raise UsageError(f"cores {self.cores!r} is refused: a whole number of 1 to 4096")
        for field_name in ("queue", "account", "job_name"):
            value = getattr(self, field_name)
            if value and not NAME.fullmatch(value):
                raise UsageError(f"{field_name} {value!r} is refused: letters, digits and "
                                 "_ . + - only, not starting with - (it goes onto the submit "
                                 "command line)")

    @property
    def seconds(self) -> int:
        total = 0
        for part in self.walltime.split(":"):
            total = total * 60 + int(part)
        return total

    def memory_in(self, lower: bool = False, suffix: str = "B") -> str:
        """The memory as "4GB" (the unit letter as the scheduler spells it)."""
        number, unit = MEMORY.fullmatch(self.memory).groups()
        unit = unit.upper() + suffix
        return number + (unit.lower() if lower else unit)


class Scheduler:
    """One batch system: what its jobs are told, what its commands answer, and how pgjob
    submits and cancels its serve jobs. Subclasses set the class attributes and override
    what their system does differently."""

    name = ""
    table: Table | None = None  # None: no job variables (outside any batch system)
    submit_command = ""  # sbatch, bsub, qsub; "" where pgjob cannot submit
    cancel_command = ""
    script = ""  # the serve job script, in pgjob/jobscripts

    def active(self, env: Env) -> bool:
        """Whether `env` is a job of this scheduler."""
        return self.table is not None and bool(env.get(self.table.marker))

    def job_id(self, env: Env) -> str:
        return env.get(self.table.job_id, "") if self.table is not None else ""

    def run_number(self, env: Env) -> int | None:
        """Which run of its job this is: 0 for the first, n after n requeues; None where
        the scheduler does not tell the job."""
        if self.table is None or not self.table.restarts:
            return None
        told = env.get(self.table.restarts, "0")
        return int(told) if told.isdigit() else None

    def restarts(self, job_id: str) -> int | None:
        """How many times the scheduler has started the job again since it first ran;
        None when it cannot tell."""
        return None

    def node_name(self, env: Env) -> str:
        """This node's name as the scheduler knows it, else the short host name. Cheap:
        it is what the lease and the serve record compare, in polling loops."""
        table = self.table
        if table is not None:
            for var in table.node_vars:
                if env.get(var, "").split():
                    return env[var].split()[0]
            if table.node_file and env.get(table.node_file):
                listed = _first_line(env[table.node_file])
                if listed:
                    return listed.split(".")[0]
        return socket.gethostname().split(".")[0]

    def query(self, job_id: str) -> QueueState | None:
        """What the scheduler says now about a job; None when it cannot be asked."""
        return None

    def limits(self, env: Env, job_id: str) -> tuple[int | None, float | None]:
        """The job's memory limit and end time, where the scheduler tells them. By default
        from the queue query: PBS's and LSF's job environments carry neither."""
        queued = self.query(job_id) if job_id else None
        if queued is None:
            return None, None
        return queued.memory_bytes, queued.end_time()

    def current(self, env: Env) -> Job:
        """The job `env` belongs to, with what it may use and when it ends."""
        job_id = self.job_id(env)
        memory, end_time = self.limits(env, job_id)
        bounds = [psutil.virtual_memory().total, cgroup_memory(), memory]
        return Job(scheduler=self.name, job_id=job_id, node=self.node_name(env),
                   memory_bytes=min(m for m in bounds if m), end_time=end_time,
                   warned_before_end=self.table is None or self.table.warns)

    # Submitting. Subclasses that can submit give `submit_argv` and `submit_successor`.

    def serve_script(self) -> Path:
        """The serve job script installed with pgjob."""
        path = Path(str(resources.files("pgjob.jobscripts") / self.script))
        if not self.script or not path.is_file():
            raise PgJobError(f"the job script {self.script} is missing from this pgjob "
                             f"installation ({path}); reinstall pgjob, or "
                             f"`{self.submit_command} jobscripts/{self.script}` by hand")
        return path

    def job_script(self) -> Path:
        """The script this job runs, as `pgjob submit` named it; else the installed one."""
        named = os.environ.get("PGJOB_SCRIPT", "")
        return Path(named) if named and Path(named).is_file() else self.serve_script()

    def submit_argv(self, home: Home, extra: tuple[str, ...], script: Path) -> list[str]:
        raise PgJobError(f"pgjob cannot submit jobs to {self.name}")

    def resource_options(self, wanted: Resources) -> tuple[str, ...]:
        """`wanted` as this scheduler's submit options."""
        raise PgJobError(f"pgjob cannot submit jobs to {self.name}")

    def submit(self, home: Home, extra: tuple[str, ...]) -> str:
        """Submit the serve job for `home`, with the user's `extra` options; its id."""
        script = self.serve_script()
        return self.run_submit(self.submit_argv(home, extra, script), home, script,
                               f"{self.submit_command} refused the serve job")

    def run_submit(self, argv: list[str], home: Home, script: Path, what: str) -> str:
        """Run a submit command line; the new job's id (its answer's last line)."""
        return proc.run(argv, timeout=60, what=what).strip().splitlines()[-1]

    def submit_successor(self, home: Home, job_id: str) -> str:
        """Queue the job that takes over from `job_id` once it has ended; its id."""
        raise PgJobError(f"pgjob cannot renew jobs of {self.name}")

    def cancel(self, job_id: str) -> None:
        if not self.cancel_command:
            raise PgJobError(f"pgjob cannot cancel jobs of {self.name}")
        proc.run([self.cancel_command, job_id], timeout=30,
                 what=f"{self.cancel_command} failed")
