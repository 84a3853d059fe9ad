"""One exception tree for every failure a user can meet.

The CLI turns a PgJobError into one line on stderr and the class's exit code; anything
else escaping the CLI is a bug and keeps its traceback.
"""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its class name if it has none): what a
    one-line warning or status says about it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PgJobError(Exception):
    """An expected failure: the message says what happened and what to do next."""

    exit_code = 3

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n{self.detail}" if self.detail else text


class UsageError(PgJobError):
    """The command was given something it cannot use (a bad home, a bad option)."""

    exit_code = 4


class BinariesNotFound(PgJobError):
    """No PostgreSQL server programs were found."""

    exit_code = 5


class CommandFailed(PgJobError):
    """An external program (initdb, postgres, ...) failed or timed out."""

    exit_code = 6

    def __init__(self, message: str, *, argv: list[str], returncode: int | None,
                 output: str = "", log_tail: str = "") -> None:
        parts = [f"command: {' '.join(argv)}",
                 f"exit code: {'timed out' if returncode is None else returncode}"]
        if output.strip():
            parts.append("output:\n" + output.strip())
        if log_tail.strip():
            parts.append("server log (last lines):\n" + log_tail.strip())
        super().__init__(message, detail="\n".join(parts))
        self.argv = argv
        self.returncode = returncode


class AlreadyServing(PgJobError):
    """Another pgjob serve already runs this home."""

    exit_code = 7


class NotPublished(PgJobError):
    """No server is published for this home, or the published one does not answer."""

    exit_code = 2


class ServerFailed(PgJobError):
    """The server died and could not be brought back."""

    exit_code = 8


class LeaseLost(PgJobError):
    """Another serve took the home's lease: this server must stop writing at once."""

    exit_code = 9


class LeaseExpired(LeaseLost):
    """This server could not renew the home's lease for its whole ttl: it stops serving
    (cleanly, quickly), since another serve may take the home over soon after."""


class TunnelFailed(PgJobError):
    """The ssh tunnel to the serving node could not be set up or kept."""

    exit_code = 10
