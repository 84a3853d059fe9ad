"""PBS Professional and Torque: what `qstat -f` says about a job, qsub for the serve job and
its successor, qdel.

A PBS job's environment names the job (PBS_JOBID) but not its end: the walltime and the
start time are attributes of the job that `qstat -f` prints, one `name = value` per line
(long values continue on lines that start with a tab).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from .. import proc
from ..errors import CommandFailed, PgJobError
from .base import QueueState, Resources, Scheduler, Table, exports

if TYPE_CHECKING:
    from ..home import Home

# PBS_NODEFILE lists the job's nodes, this one first. PBS sends no signal before the
# walltime: serve stops by itself.
TABLE = Table("PBS_JOBID", "PBS_JOBID", node_file="PBS_NODEFILE", warns=False)

# qstat's one-letter job_state, in the words `pgjob status` uses for Slurm.
STATES = {"Q": "PENDING", "W": "PENDING", "H": "HELD", "T": "PENDING", "R": "RUNNING",
          "B": "RUNNING", "E": "EXITING", "S": "SUSPENDED", "U": "SUSPENDED",
          "C": "COMPLETED", "F": "COMPLETED", "X": "COMPLETED", "M": "MOVED"}
SIZE_UNITS = {"": 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40,
              "pb": 2**50, "w": 8, "kw": 8 * 2**10, "mw": 8 * 2**20, "gw": 8 * 2**30,
              "tw": 8 * 2**40}


def parse_qstat(text: str) -> dict[str, str]:
    """The attributes of the first job in `qstat -f` output, continuation lines joined."""
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith("\t") and key:
            fields[key] += line.strip()
        elif " = " in line:
            key, value = line.strip().split(" = ", 1)
            fields[key] = value.strip()
        elif line.startswith("Job Id:") and fields:
            break  # the next job's attributes
    return fields


def parse_duration(text: str) -> float | None:
    """Seconds in PBS's [[hours:]minutes:]seconds form (hours may pass 24), or seconds."""
    parts = text.strip().split(":")
    if len(parts) > 3 or not all(p.replace(".", "", 1).isdigit() for p in parts):
        return None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + float(p)
    return seconds


def parse_size(text: str) -> int | None:
    """Bytes in PBS's size form: a number and a unit (b, kb, mb, gb, tb, pb; w for words)."""
    text = text.strip().lower()
    number = text.rstrip("bkmgtpw")
    unit = text[len(number):]
    if not number.isdigit() or unit not in SIZE_UNITS:
        return None
    return int(number) * SIZE_UNITS[unit]


def parse_time(text: str) -> float | None:
    """An epoch time as qstat prints it: "Thu Feb 22 14:27:48 2018" (local time) or seconds."""
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        return time.mktime(time.strptime(" ".join(text.split()), "%a %b %d %H:%M:%S %Y"))
    except ValueError:
        return None


def time_left(fields: dict[str, str], now: float) -> float | None:
    """Seconds until the walltime runs out: from the start time (PBS Pro's stime, Torque's
    start_time) plus the walltime; else Torque's own Walltime.Remaining; else the walltime
    less resources_used.walltime (which the execution host updates only now and then)."""
    walltime = parse_duration(fields.get("Resource_List.walltime", ""))
    started = parse_time(fields.get("stime") or fields.get("start_time", ""))
    if walltime is not None and started is not None:
        return max(0.0, started + walltime - now)
    remaining = parse_duration(fields.get("Walltime.Remaining", ""))
    if remaining is not None:
        return remaining
    used = parse_duration(fields.get("resources_used.walltime", ""))
    if walltime is not None and used is not None:
        return max(0.0, walltime - used)
    return None


def state_of(fields: dict[str, str], now: float | None = None) -> QueueState:
    state = fields.get("job_state", "")
    running = state in ("R", "B", "E")
    # exec_host: "node1/0*2+node2/0*2" (PBS Pro) or "node1/0-1+..." (Torque)
    node = fields.get("exec_host", "").split("+")[0].split("/")[0]
    return QueueState(STATES.get(state, state or "UNKNOWN"),
                      time_left(fields, now or time.time()) if running else None,
                      node.split(".")[0], parse_size(fields.get("Resource_List.mem", "")))


def show(job_id: str) -> dict[str, str]:
    """`qstat -f JOBID` as attributes; also finished jobs (-x) where PBS Pro keeps them."""
    for argv in (["qstat", "-f", job_id], ["qstat", "-x", "-f", job_id]):
        try:
            fields = parse_qstat(proc.run(argv, timeout=20, what="qstat failed"))
        except CommandFailed:
            continue  # "Unknown Job Id" once the job has left the server's memory
        if fields:
            return fields
    return {}


def successor_argv(job_id: str, fields: dict[str, str], script: Path,
                   exports: dict[str, str]) -> list[str]:
    """qsub for the job that takes over from `job_id` once it has ended: the same script
    (whose #PBS lines PBS reads again), and what qsub's command line may have changed."""
    argv = ["qsub", "-V", "-W", f"depend=afterany:{job_id}",
            "-v", ",".join(f"{k}={v}" for k, v in exports.items())]
    carried = {"Job_Name": "-N", "queue": "-q", "Account_Name": "-A"}
    for field, option in carried.items():
        if fields.get(field):
            argv += [option, fields[field]]
    resources = ["walltime"]
    # PBS Pro folds mem and ncpus into select; Torque keeps nodes and mem apart. The two
    # syntaxes must not be mixed.
    resources += ["select"] if fields.get("Resource_List.select") else ["nodes", "mem"]
    for name in resources:
        if fields.get(f"Resource_List.{name}"):
            argv += ["-l", f"{name}={fields[f'Resource_List.{name}']}"]
    out_path = fields.get("Output_Path", "").split(":", 1)[-1]
    if out_path:
        argv += ["-j", "oe", "-o", f"{Path(out_path).parent}/"]
    return argv + [str(script)]


def qsub_argv(home: Home, extra: tuple[str, ...], script: Path) -> list[str]:
    # -o to a folder: PBS Pro names the log JOBID.OU in it. -V passes this environment
    # on (PATH to pgjob), as sbatch does by itself.
    variables = ",".join(f"{k}={v}" for k, v in exports(home, script).items())
    return ["qsub", "-V", "-v", variables, "-j", "oe", "-o", f"{home.logs}/", *extra,
            str(script)]


class Pbs(Scheduler):
    name = "pbs"
    table = TABLE
    submit_command = "qsub"
    cancel_command = "qdel"
    script = "pgjob-serve.pbs"

    def query(self, job_id: str) -> QueueState:
        fields = show(job_id)
        return state_of(fields) if fields else QueueState("UNKNOWN", None, "")

    def submit_argv(self, home: Home, extra: tuple[str, ...], script: Path) -> list[str]:
        return qsub_argv(home, extra, script)

    def resource_options(self, wanted: Resources) -> tuple[str, ...]:
        # PBS Pro's chunk syntax; Torque users pass -l nodes=...:ppn=... in `extra`.
        chunk = "".join([f":ncpus={wanted.cores}" if wanted.cores else "",
                         f":mem={wanted.memory_in(lower=True)}" if wanted.memory else ""])
        argv: list[str] = []
        if wanted.walltime:
            argv += ["-l", f"walltime={wanted.walltime}"]
        if chunk:
            argv += ["-l", "select=1" + chunk]
        for option, value in (("-q", wanted.queue), ("-A", wanted.account),
                              ("-N", wanted.job_name)):
            if value:
                argv += [option, value]
        return tuple(argv)

    def submit_successor(self, home: Home, job_id: str) -> str:
        fields = show(job_id)
        if not fields:
            raise PgJobError(f"cannot renew job {job_id}: `qstat -f {job_id}` shows nothing")
        script = self.job_script()
        return self.run_submit(successor_argv(job_id, fields, script, exports(home, script)),
                               home, script, "qsub refused the next serve job")
