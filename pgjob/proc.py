"""The one wrapper through which pgjob runs external programs.

argv lists only, never a shell; always a timeout; output captured; failures raise
CommandFailed carrying the command, exit code, output and, when given, the server log's tail.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO, Callable

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
