"""Publishing, reading and waiting for the connection endpoint of a home.

The endpoint file is replaced atomically, so a reader sees either the old content or the
new, never half of it. Withdrawing rewrites it as "withdrawn" (keeping the generation),
so a stale address is never handed out.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg

from .cluster import connect
from .errors import NotPublished, first_line
from .home import Home, json_object
from .tls import SSLMODE
from .waiting import until

SERVING = "serving"
WITHDRAWN = "withdrawn"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    database: str
    user: str
    passfile: str
    node: str
    job_id: str
    scheduler: str
    pid: int
    started_at: float
    generation: int
    system_identifier: str
    state: str = SERVING
    sslrootcert: str = ""
    pooler: str = ""  # "pgbouncer": no prepared statements across transactions

    # `sslmode` is verify-full everywhere except through an ssh tunnel (see tunnel.py),
    # where the address connected to is 127.0.0.1, which no server certificate names.
    def _query(self, sslmode: str) -> str:
        return (f"passfile={quote(self.passfile)}&sslmode={sslmode}"
                f"&sslrootcert={quote(self.sslrootcert)}")

    def sqlalchemy_url(self, sslmode: str = SSLMODE) -> str:
        return (f"postgresql+psycopg://{quote(self.user)}@{self.host}:{self.port}/"
                f"{quote(self.database)}?{self._query(sslmode)}")

    def libpq_url(self, sslmode: str = SSLMODE) -> str:
        return (f"postgresql://{quote(self.user)}@{self.host}:{self.port}/"
                f"{quote(self.database)}?{self._query(sslmode)}")

    def hydra_override(self) -> str:
        """`hydra.sweeper.storage='postgresql://...'`: the libpq URL (SQLAlchemy's default
        driver, psycopg2 for the Optuna 2.10 that hydra-optuna-sweeper pins) as one Hydra
        command-line override. Hydra's grammar refuses an unquoted `?`; inside its single
        quotes every character of the URL is literal, since quote() has encoded any quote,
        backslash, `$` or space of the paths."""
        return f"hydra.sweeper.storage='{self.libpq_url()}'"

    def libpq_env(self, sslmode: str = SSLMODE) -> dict[str, str]:
        """The PG* variables that point libpq tools (psql, pg_dump) at this server."""
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGDATABASE": self.database,
                "PGUSER": self.user, "PGPASSFILE": self.passfile, "PGSSLMODE": sslmode,
                "PGSSLROOTCERT": self.sslrootcert}

    def env_lines(self) -> str:
        pairs = {**self.libpq_env(), "PGJOB_URL": self.sqlalchemy_url()}
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in pairs.items())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def connect(self, timeout: float = 5, sslmode: str = SSLMODE) -> psycopg.Connection:
        return connect(host=self.host, port=self.port, user=self.user, dbname=self.database,
                       passfile=Path(self.passfile), timeout=timeout, sslmode=sslmode,
                       sslrootcert=self.sslrootcert)


def read_raw(home: Home) -> dict | None:
    """The endpoint file's fields, or None when it is missing or not (yet) valid JSON."""
    try:
        return json_object(home.endpoint_file.read_text())
    except (OSError, ValueError):
        return None


def read(home: Home) -> Endpoint | None:
    """The published endpoint, or None when nothing usable is published (missing,
    half-written, or withdrawn). Checked each time: a worker that reconnects later must
    not follow a home that someone swapped for theirs meanwhile."""
    home.check_trusted()
    data = read_raw(home)
    if not data or data.get("state") != SERVING:
        return None
    try:
        found = Endpoint(**{f.name: data[f.name] for f in dataclasses.fields(Endpoint)
                            if f.name in data or f.default is dataclasses.MISSING})
    except (KeyError, TypeError):
        return None
    # The secrets as this reader sees the home: right even if the home was moved or is
    # mounted elsewhere on this node.
    return dataclasses.replace(found, passfile=str(home.app_passfile),
                               sslrootcert=str(home.ca_cert))


def last_generation(home: Home) -> int:
    data = read_raw(home) or {}
    value = data.get("generation", 0)
    return value if isinstance(value, int) else 0


def publish(home: Home, endpoint: Endpoint) -> None:
    home.write(home.endpoint_file, endpoint.to_json())


def withdraw(home: Home, reason: str) -> None:
    """Mark the endpoint withdrawn so no client is sent to a server that is going away."""
    data = read_raw(home) or {}
    home.write(home.endpoint_file, json.dumps(
        {"state": WITHDRAWN, "generation": data.get("generation", 0), "reason": reason,
         "node": data.get("node", ""), "job_id": data.get("job_id", "")}, indent=2) + "\n")


def _describe(home: Home) -> str:
    data = read_raw(home)
    if data is None:
        if home.endpoint_file.exists():
            return f"the endpoint file {home.endpoint_file} is unreadable or half-written"
        return "no server has been published for it yet"
    if data.get("state") == WITHDRAWN:
        return f"its server was stopped ({data.get('reason', 'withdrawn')})"
    return "its endpoint file is incomplete"


def check(endpoint: Endpoint, timeout: float = 5) -> str | None:
    """None when an authenticated connection works, else why it did not."""
    try:
        with endpoint.connect(timeout=timeout) as conn:
            conn.execute("select 1")
        return None
    except psycopg.Error as exc:
        return first_line(exc)


def _serve_gone(home: Home) -> str:
    """Why a published server may not answer: its serve was killed without withdrawing."""
    from . import lease  # here: workers import this module and need no lease machinery

    held = lease.read(home)
    if held is not None and (held.released or held.holder_gone() or held.expired()):
        return ("; the serve that published it is gone (killed outright, or its node or job "
                "ended), so nothing will answer there: start a new serve")
    return ""


def wait_connectable(home: Home, timeout: float = 0) -> Endpoint:
    """The published endpoint once an authenticated connection to it succeeds.

    Waits up to `timeout` seconds (0: one look). Raises NotPublished saying what was seen.
    """
    last_problem: list[str] = []

    def attempt() -> Endpoint | None:
        found = read(home)
        if found is None:
            last_problem[:] = [f"nothing is served for {home.path}: {_describe(home)}"]
            return None
        problem = check(found)
        if problem:
            last_problem[:] = [f"the server published at {found.host}:{found.port} "
                               f"(node {found.node}, job {found.job_id or '-'}) does not "
                               f"accept connections: {problem}{_serve_gone(home)}"]
            return None
        return found

    got = until(attempt, timeout, interval=0.2, max_interval=5)
    if got is None:
        waited = f" after waiting {timeout:.0f} s" if timeout else ""
        raise NotPublished(f"{last_problem[0]}{waited}. Start the server with "
                           "`sbatch jobscripts/pgjob-serve.sh` or `pgjob serve`, check it with "
                           "`pgjob status`, or wait longer with --wait SECONDS.")
    return got
