"""Slurm: a job's facts from its environment (SLURM_*), squeue and scontrol for the rest,
sbatch for the serve job and its successor.

Slurm puts the job's memory and, in recent versions, its end (SLURM_JOB_END_TIME) in the
job's environment; where the end is missing, squeue's time left gives it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import proc
from ..errors import CommandFailed, PgJobError
from .base import MB, Env, QueueState, Resources, Scheduler, Table, own_command

if TYPE_CHECKING:
    from ..home import Home

TABLE = Table("SLURM_JOB_ID", "SLURM_JOB_ID", node_vars=("SLURMD_NODENAME",),
              restarts="SLURM_RESTART_COUNT")


def parse_duration(text: str) -> float | None:
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


def memory(env: Env) -> int | None:
    """The job's memory from --mem (per node) or --mem-per-cpu times its CPUs here."""
    if env.get("SLURM_MEM_PER_NODE"):
        return int(env["SLURM_MEM_PER_NODE"]) * MB
    if env.get("SLURM_MEM_PER_CPU"):
        cpus = env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_JOB_CPUS_PER_NODE", "1")
        return int(env["SLURM_MEM_PER_CPU"]) * int(cpus.split("(")[0].split(",")[0]) * MB
    return None


def parse_show(text: str) -> dict[str, str]:
    """The fields of `scontrol show job -o`: one line of Name=value words."""
    return dict(f.split("=", 1) for f in text.split() if "=" in f)


def show_job(job_id: str, what: str = "scontrol failed", timeout: float = 20) -> dict[str, str]:
    """`scontrol show job` of a job, as its fields; CommandFailed when Slurm cannot show it."""
    return parse_show(proc.run(["scontrol", "show", "job", "-o", job_id], timeout=timeout,
                               what=what))


def sbatch_argv(home: Home, extra: tuple[str, ...], script: Path) -> list[str]:
    # Our defaults come first: sbatch lets a later option override an earlier one.
    return ["sbatch", "--parsable", f"--export=ALL,PGJOB_HOME={home.path},PGJOB={own_command()}",
            f"--output={home.logs}/serve-%j.out", *extra, str(script), str(home.path)]


def successor_argv(home: Home, job_id: str, shown: dict[str, str]) -> list[str]:
    """sbatch for the job that takes over from `job_id`: same script, same resources, any
    node, starting once `job_id` has ended (its #SBATCH lines are read again by sbatch).
    `shown` is `scontrol show job` of `job_id`."""
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
        # Slurm shows the log with %j filled in: put it back in the file's name only, as
        # the folders may hold the same digits (/tmp/run-6/serve-6.out for job 6).
        log = Path(shown["StdOut"])
        argv.append(f"--output={log.with_name(log.name.replace(job_id, '%j'))}")
    argv += [shown["Command"], str(home.path)]
    return argv


class Slurm(Scheduler):
    name = "slurm"
    table = TABLE
    submit_command = "sbatch"
    cancel_command = "scancel"
    script = "pgjob-serve.sh"

    def query(self, job_id: str) -> QueueState | None:
        try:
            out = proc.run(["squeue", "-h", "-j", job_id, "-o", "%T|%L|%N"], timeout=20,
                           what="squeue failed")
        except CommandFailed:
            out = ""  # squeue says "Invalid job id" once the job has left its memory
        if "|" in out:
            state, left, node = out.strip().splitlines()[0].split("|", 2)
            return QueueState(state, parse_duration(left), node)
        try:
            shown = show_job(job_id)
        except CommandFailed:
            return QueueState("UNKNOWN", None, "")
        return QueueState(shown.get("JobState", "UNKNOWN"), None, shown.get("NodeList", ""))

    def restarts(self, job_id: str) -> int | None:
        try:
            shown = show_job(job_id)
        except CommandFailed:
            return None
        count = shown.get("Restarts", "")
        return int(count) if count.isdigit() else None

    def limits(self, env: Env, job_id: str) -> tuple[int | None, float | None]:
        end = env.get("SLURM_JOB_END_TIME", "")
        if end.isdigit():
            return memory(env), float(end)
        queued = self.query(job_id) if job_id else None
        return memory(env), queued.end_time() if queued is not None else None

    def submit_argv(self, home: Home, extra: tuple[str, ...], script: Path) -> list[str]:
        return sbatch_argv(home, extra, script)

    def resource_options(self, wanted: Resources) -> tuple[str, ...]:
        given = {"--time": wanted.walltime,
                 "--mem": wanted.memory and wanted.memory_in(suffix=""),
                 "--cpus-per-task": wanted.cores or "", "--partition": wanted.queue,
                 "--account": wanted.account, "--job-name": wanted.job_name}
        return tuple(f"{option}={value}" for option, value in given.items() if value)

    def run_submit(self, argv: list[str], home: Home, script: Path, what: str) -> str:
        # --parsable answers "jobid" or "jobid;cluster"
        return super().run_submit(argv, home, script, what).split(";")[0]

    def submit_successor(self, home: Home, job_id: str) -> str:
        shown = show_job(job_id, what=f"scontrol could not show job {job_id}", timeout=30)
        if not shown.get("Command") or not Path(shown["Command"]).is_file():
            raise PgJobError(f"cannot renew job {job_id}: its script ({shown.get('Command')}) "
                             "is not a file that a new job could run")
        script = Path(shown["Command"])
        return self.run_submit(successor_argv(home, job_id, shown), home, script,
                               "sbatch refused the next serve job")
