"""The one wrapper through which pgjob runs external programs.

argv lists only, never a shell; always a timeout; output captured; failures raise
CommandFailed carrying the command, exit code, output and, when given, the server log's tail.
"""
from __future__ import annotations

import ctypes
import os
import pwd
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from .errors import CommandFailed

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Account:
    """An OS account that PostgreSQL programs run as when pgjob itself runs as root."""

    name: str
    uid: int
    gid: int

    @classmethod
    def named(cls, name: str) -> "Account":
        entry = pwd.getpwnam(name)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _user_kwargs(account: Account | None) -> dict:
    if account is None or account.uid == os.geteuid():
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


def run(argv: list[str], *, timeout: float, what: str, account: Account | None = None,
        env: dict[str, str] | None = None, log_tail: Callable[[], str] | None = None,
        cwd: str | Path | None = None, stdin_text: str | None = None,
        stdout: IO | None = None) -> str:
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
                              cwd=cwd or "/",
                              **_user_kwargs(account))
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


def _die_with_parent() -> None:
    # If pgjob serve is killed outright, the postmaster gets SIGINT (fast shutdown)
    # instead of living on as an orphan that holds the data directory.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)
    os.setpgrp()


def spawn(argv: list[str], *, output: IO, account: Account | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a long-running child (the postmaster) that dies with its parent.

    The child gets its own process group so a Ctrl-C in a terminal reaches pgjob,
    which then shuts the server down in order, rather than reaching both at once.
    """
    argv = [str(a) for a in argv]
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                stderr=subprocess.STDOUT, env=env, cwd="/",
                                preexec_fn=_die_with_parent, **_user_kwargs(account))
    except OSError as exc:
        raise CommandFailed(f"could not start {argv[0]}: {exc.strerror}", argv=argv,
                            returncode=None) from None
