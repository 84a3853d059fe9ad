"""The one wrapper through which pgjob runs external programs, and owns the long-running ones.

argv lists only, never a shell; always a timeout; output captured; failures raise
CommandFailed carrying the command, exit code, output and, when given, the server log's tail.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence

import psutil

from .errors import CommandFailed

# A long-running child (the postmaster, pgbouncer) must die with serve, not live on as an
# orphan that holds the data directory. Linux's parent-death signal does that, but setting
# it needs code between fork and exec, and preexec_fn is unsafe in a process with threads
# (serve has backup and heartbeat threads). So the child starts as this tiny Python, which
# asks for SIGINT (PostgreSQL's fast shutdown) on its parent's death, makes sure the parent
# did not die already, and replaces itself with the program (the setting survives exec).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG\n"
    "os.getppid() == int(sys.argv[1]) or sys.exit(70)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def run(argv: list[str], *, timeout: float, what: str, env: dict[str, str] | None = None,
        log_tail: Callable[[], str] | None = None, cwd: str | Path | None = None,
        stdin_text: str | None = None, stdout: IO | None = None) -> str:
    """Run a program to completion and return its combined output.

    `what` names the step for the error message ("initdb failed: ..."); `stdin_text`, when
    given, is the program's standard input (bsub reads a job script's #BSUB lines there).
    `stdout`, when given, is an open file that receives the program's standard output (a
    dump written into a file pgjob created); only its standard error is captured then.
    """
    argv = [str(a) for a in argv]
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE if stdout is None else stdout,
                              stderr=subprocess.STDOUT if stdout is None else subprocess.PIPE,
                              input=stdin_text, text=True, timeout=timeout, env=env,
                              cwd=cwd or "/")
    except subprocess.TimeoutExpired as exc:
        out = exc.output if stdout is None else exc.stderr
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise CommandFailed(f"{what}: no answer after {timeout:.0f} s", argv=argv,
                            returncode=None, output=out or "",
                            log_tail=log_tail() if log_tail else "") from None
    except OSError as exc:
        raise CommandFailed(f"{what}: could not run {argv[0]}: {exc.strerror}", argv=argv,
                            returncode=None) from None
    output = done.stdout if stdout is None else done.stderr
    if done.returncode != 0:
        raise CommandFailed(f"{what} (exit code {done.returncode})", argv=argv,
                            returncode=done.returncode, output=output,
                            log_tail=log_tail() if log_tail else "")
    return output


def spawn(argv: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a long-running child (the postmaster) that dies with its parent, its output
    appended to `log`.

    The child gets a session of its own, so a Ctrl-C in a terminal reaches pgjob, which
    then shuts the server down in order, rather than reaching both at once.
    """
    argv = [str(a) for a in argv]
    trampoline = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
    try:
        output = open(log, "a")
    except OSError as exc:
        raise CommandFailed(f"could not start {Path(argv[0]).name}: cannot write its log "
                            f"{log}: {exc.strerror}; check that file (it must be a file of "
                            "yours, not a link elsewhere), or move it away and try again",
                            argv=argv, returncode=None) from None
    try:
        with output:
            return subprocess.Popen(trampoline, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, env=env, cwd="/",
                                    start_new_session=True)
    except OSError as exc:
        raise CommandFailed(f"could not start {argv[0]}: {exc.strerror}", argv=argv,
                            returncode=None) from None


@dataclass
class ManagedProcess:
    """One long-running child that pgjob started and owns (the postmaster, pgbouncer):
    spawned to die with pgjob, asked whether it still runs, and stopped by a ladder of
    signals, each given its time to work before the next. Subclasses say what to run."""

    log: Path  # the child's output is appended here
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)

    def command(self) -> list:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None  # this process's own

    def spawn(self) -> None:
        self.process = spawn(self.command(), log=self.log, env=self.environment())

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def send(self, sig: int) -> None:
        if self.alive():
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass

    def stop_by(self, ladder: Sequence[tuple[int, float]]) -> int | None:
        """Send each (signal, seconds) in turn until the child has exited; its exit code,
        or None when it never ran."""
        if self.process is None:
            return None
        for sig, wait in ladder:
            if self.process.poll() is not None:
                break
            try:
                self.process.send_signal(sig)
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return self.process.poll()


def same_process(pid: object, create_time: object) -> bool:
    """Whether the process `pid` on this node is the one that started at `create_time`
    (a pid alone may have been reused by another process since)."""
    try:
        return psutil.Process(pid).create_time() == create_time
    except (TypeError, ValueError, OverflowError, psutil.Error):
        return False
