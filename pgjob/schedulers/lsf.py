"""IBM Spectrum LSF: what `bjobs` says about a job, bsub for the serve job and its
successor, bkill.

An LSF job's environment names the job (LSB_JOBID), its hosts (LSB_HOSTS), queue
(LSB_QUEUE) and name (LSB_JOBNAME), but not its end:
`bjobs -o` prints the time left. LSF reads a script's #BSUB lines only when the script
comes on bsub's standard input, so the successor's script is given there.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .. import proc
from ..errors import CommandFailed
from .base import Env, QueueState, Resources, Scheduler, Table, exports

if TYPE_CHECKING:
    from ..home import Home

# LSB_HOSTS names a host once per slot, this one first; LSB_MCPU_HOSTS ("hostA 2 hostB 2")
# where LSB_HOSTS would be too long.
TABLE = Table("LSB_JOBID", "LSB_JOBID", node_vars=("LSB_HOSTS", "LSB_MCPU_HOSTS"))

STATES = {"PEND": "PENDING", "RUN": "RUNNING", "DONE": "COMPLETED", "EXIT": "FAILED",
          "PSUSP": "SUSPENDED", "USUSP": "SUSPENDED", "SSUSP": "SUSPENDED",
          "UNKWN": "UNKNOWN", "ZOMBI": "UNKNOWN"}
# -hms: times as hours:minutes:seconds, whatever LSB_HMS_TIME_FORMAT the site set.
BJOBS = ["bjobs", "-noheader", "-hms", "-o", "stat exec_host time_left delimiter='|'"]
SUBMITTED = re.compile(r"Job <(\d+(?:\[\d+\])?)>")


def parse_time_left(text: str) -> float | None:
    """Seconds in bjobs' time_left: "hh:mm:ss" (with -hms) or "hours:minutes", each
    followed by a status letter (L: a run limit, E: an estimate, X: overrun); "-": none."""
    words = text.split()
    if not words:
        return None
    parts = words[0].split(":")
    if not 2 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    hours, minutes, seconds = (int(p) for p in (parts + ["0"])[:3])
    return hours * 3600 + minutes * 60 + seconds


def parse_bjobs(text: str) -> QueueState:
    for line in text.splitlines():
        if line.count("|") == 2:
            state, hosts, left = (f.strip() for f in line.split("|"))
            # exec_host: "hostA", or "4*hostA:2*hostB" for a job on several hosts
            node = hosts.split(":")[0].split("*")[-1] if hosts != "-" else ""
            return QueueState(STATES.get(state, state), parse_time_left(left)
                              if state == "RUN" else None, node)
    return QueueState("UNKNOWN", None, "")  # "Job <ID> is not found"


def job_id_from(output: str) -> str:
    """The id in bsub's answer "Job <1234> is submitted to queue <normal>."."""
    found = SUBMITTED.search(output)
    if not found:
        raise CommandFailed(f"bsub did not say which job it submitted: {output.strip()!r}",
                            argv=["bsub"], returncode=0, output=output)
    return found.group(1)


def successor_argv(job_id: str, logs: Path, env: Env | None = None) -> list[str]:
    """bsub (script on its standard input) for the job that takes over from `job_id` once
    it has ended, in the same queue, with the same name, logging into `logs`."""
    env = os.environ if env is None else env
    argv = ["bsub", "-w", f"ended({job_id})", "-o", f"{logs}/serve-%J.out"]
    if env.get("LSB_QUEUE"):
        argv += ["-q", env["LSB_QUEUE"]]
    if env.get("LSB_JOBNAME"):
        argv += ["-J", env["LSB_JOBNAME"]]
    return argv


def bsub_argv(home: Home, extra: tuple[str, ...]) -> list[str]:
    # The script goes on standard input (see Lsf.run_submit).
    return ["bsub", "-o", f"{home.logs}/serve-%J.out", *extra]


class Lsf(Scheduler):
    name = "lsf"
    table = TABLE
    submit_command = "bsub"
    cancel_command = "bkill"
    script = "pgjob-serve.lsf"

    def query(self, job_id: str) -> QueueState:
        try:
            return parse_bjobs(proc.run([*BJOBS, job_id], timeout=20, what="bjobs failed"))
        except CommandFailed:  # bjobs exits non-zero for a job it no longer knows
            return QueueState("UNKNOWN", None, "")

    def submit_argv(self, home: Home, extra: tuple[str, ...], script: Path) -> list[str]:
        return bsub_argv(home, extra)

    def resource_options(self, wanted: Resources) -> tuple[str, ...]:
        argv: list[str] = []
        if wanted.walltime:  # bsub -W takes [hours:]minutes
            minutes = max(1, -(-wanted.seconds // 60))
            argv += ["-W", f"{minutes // 60}:{minutes % 60:02d}"]
        if wanted.memory:
            argv += ["-M", wanted.memory_in()]
        for option, value in (("-n", wanted.cores or ""), ("-q", wanted.queue),
                              ("-P", wanted.account), ("-J", wanted.job_name)):
            if value:
                argv += [option, str(value)]
        return tuple(argv)

    def run_submit(self, argv: list[str], home: Home, script: Path, what: str) -> str:
        """Submit `script` with bsub on its standard input; LSF passes the environment,
        with `exports`, on to the job."""
        return job_id_from(proc.run(argv, timeout=60, what=what,
                                    stdin_text=script.read_text(),
                                    env={**os.environ, **exports(home, script)}))

    def submit_successor(self, home: Home, job_id: str) -> str:
        return self.run_submit(successor_argv(job_id, home.logs), home, self.job_script(),
                               "bsub refused the next serve job")
