"""pgjob from Python: a handle on a home's server job, in the style of submitit and
dask-jobqueue.

    job = pgjob.submit(walltime="08:00:00", memory="4GB")   # sbatch, qsub or bsub
    storage_url = job.url(wait=600)                        # once it serves
    job.status()["state"], job.stop(wait=120)

`pgjob.preview(...)` shows the command and job script before anything is submitted;
`pgjob.attach()` gives the handle of the job last submitted for a home; `pgjob.serving()`
runs the server inside this allocation (say the first node of `salloc -N 4`) for the
length of a `with` block and stops it cleanly at its end.
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import control, endpoint, health, proc, schedulers, submission
from .errors import PgJobError, UsageError
from .home import Home, open_home
from .schedulers import QueueState, Resources

FORMATS = ("sqlalchemy", "libpq", "json", "env", "hydra")


@dataclass(frozen=True)
class Submission:
    """What `submit` would run: the submit command line and the job script it hands over."""

    scheduler: str
    argv: tuple[str, ...]
    script: Path

    def __str__(self) -> str:
        return " ".join(self.argv) + "\n\n" + self.script.read_text()


@dataclass(frozen=True)
class ServerJob:
    """A home's server job: its id, and the questions a driver script asks about it."""

    home: Home
    job_id: str  # "" for a server that runs outside any batch job
    scheduler: str

    def url(self, wait: float = 600, format: str = "sqlalchemy") -> str:
        """How to connect, once the server accepts connections (waits up to `wait` s):
        an Optuna/SQLAlchemy URL by default, or `format` as `pgjob url --format` has it."""
        return connection_text(self.home, wait, format)

    def storage(self, wait: float = 600, **options):
        """The Optuna storage on this server (see `pgjob.optuna_storage`)."""
        from .storage import optuna_storage

        return optuna_storage(self.home.path, wait=wait, **options)

    def status(self) -> dict:
        """What `pgjob status --json` says: "state" is healthy, degraded or down."""
        return health.check(self.home).as_dict()

    def state(self) -> QueueState | None:
        """What the scheduler says of the job now (None outside a batch system)."""
        return schedulers.query(self.scheduler, self.job_id)

    def stop(self, wait: float = 120) -> control.StopReport:
        """Stop the server cleanly (the job then ends) and say what was verified."""
        return control.request_stop(self.home.path, wait)


def connection_text(home: Home, wait: float, format: str) -> str:
    """What `pgjob url --format FORMAT` prints for `home`, once its server accepts
    connections; the Optuna URL forms are refused on a journal home, saying what to use."""
    if format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if format in ("sqlalchemy", "env", "hydra"):  # the Optuna URLs
        from .storage import check_url_works

        check_url_works(home)
    found = endpoint.wait_connectable(home, timeout=wait)
    return {"sqlalchemy": found.sqlalchemy_url, "libpq": found.libpq_url,
            "json": found.to_json, "env": found.env_lines,
            "hydra": found.hydra_override}[format]().rstrip("\n")


def _resources(**given) -> Resources:
    return Resources(**{name: value for name, value in given.items() if value})


def preview(home=None, *, scheduler: str = "", extra: tuple[str, ...] = (),
            **resources) -> Submission:
    """The serve job as `submit` would hand it over, submitting nothing. `resources`:
    walltime="HH:MM:SS", memory="4GB", cores, queue, account, job_name; `extra`: more
    options for the submit command, as they are."""
    target = open_home(home).require()
    chosen = (schedulers.get(scheduler) if scheduler
              else submission.choose_scheduler())
    options = chosen.resource_options(_resources(**resources)) + tuple(extra)
    script = chosen.serve_script()
    return Submission(chosen.name, tuple(chosen.submit_argv(target, options, script)), script)


def submit(home=None, *, scheduler: str = "", extra: tuple[str, ...] = (),
           **resources) -> ServerJob:
    """Submit the serve job for `home` (default: $PGJOB_HOME) with these resources (see
    `preview`) and return its handle at once; `url(wait=...)` waits for it to serve."""
    target = open_home(home).require()
    chosen = submission.choose_scheduler(scheduler)
    options = chosen.resource_options(_resources(**resources)) + tuple(extra)
    return ServerJob(target, submission.submit(target, options, chosen.name), chosen.name)


def attach(home=None) -> ServerJob:
    """The handle of the server that serves `home` now, else of its job last submitted."""
    target = open_home(home).require()
    published = endpoint.read(target)
    if published is not None:
        return ServerJob(target, published.job_id, published.scheduler)
    record = target.read_record(target.submitted)
    if record.get("job_id"):
        return ServerJob(target, str(record["job_id"]), str(record.get("scheduler", "")))
    raise PgJobError(f"nothing serves {target.path} and no serve job was submitted for it; "
                     "submit one with pgjob.submit() or `pgjob submit`")


@contextmanager
def serving(home=None, *, host: str = "", interface: str = "", wait: float = 120,
            log: str | os.PathLike | None = None) -> Iterator[ServerJob]:
    """Serve `home` from this process's node for the length of the `with` block: for one
    allocation that holds the server and its workers (`salloc -N 4`: the server here,
    workers by `srun` on the other nodes). `pgjob serve` runs in the background, its output
    in `log` (default: the home's logs/serve-<pid>.out); the block starts once it accepts
    connections, and at the block's end it is stopped cleanly and waited for."""
    target = open_home(home).require()
    log_path = Path(log) if log else target.logs / f"serve-{os.getpid()}.out"
    argv = [sys.executable, "-m", "pgjob", "serve", "--home", str(target.path)]
    argv += ["--host", host] if host else []
    argv += ["--interface", interface] if interface else []
    # Through proc.spawn: serve dies with this process (a fast, clean stop), so a driver
    # killed outright leaves no server behind in the allocation.
    process = proc.spawn(argv, log=log_path)
    try:
        found = _wait_serving(target, process, wait, log_path)
        yield ServerJob(target, found.job_id, found.scheduler)
    finally:
        if process.poll() is None:
            control.request_stop(target.path, wait=60)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_serving(home: Home, process: subprocess.Popen, wait: float,
                  log_path: Path) -> endpoint.Endpoint:
    from .waiting import until

    def ready():
        if process.poll() is not None:
            return True
        try:
            return endpoint.wait_connectable(home)
        except PgJobError:
            return None
    found = until(ready, wait, interval=0.2)
    if process.poll() is not None:
        raise PgJobError(f"pgjob serve exited (code {process.returncode}) before it served "
                         f"{home.path}; see {log_path}")
    if not isinstance(found, endpoint.Endpoint):
        raise PgJobError(f"pgjob serve did not serve {home.path} within {wait:.0f} s; see "
                         f"{log_path}")
    return found
