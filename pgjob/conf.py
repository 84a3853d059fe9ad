"""The PostgreSQL configuration pgjob owns: pgjob.conf, its include line, a pg_hba block.

A user's own edits to postgresql.conf and pg_hba.conf outside these pieces survive every
`pgjob init` and `pgjob serve`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HEADER = "# managed by pgjob: rewritten by `pgjob init` and at every `pgjob serve`; edits here are lost\n"
INCLUDE_LINE = "include_if_exists = 'pgjob.conf'  # added by pgjob"
HBA_BEGIN = "# BEGIN pgjob (managed by pgjob; lines inside this block are rewritten)"
HBA_END = "# END pgjob"
AUTH = "scram-sha-256"
PGJOB_OWN_CONNECTIONS = 5  # serve's health checks, status, backups
SUPERUSER_SLOTS = 3


def quote(value: object) -> str:
    """A postgresql.conf value: numbers bare, everything else single-quoted once."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


def render_conf(params: dict[str, object]) -> str:
    return HEADER + "".join(f"{key} = {quote(value)}\n" for key, value in params.items())


def max_connections(workers: int) -> int:
    """Two backends per worker process at peak (storage pool), plus pgjob's and superuser slots."""
    return 2 * workers + PGJOB_OWN_CONNECTIONS + SUPERUSER_SLOTS


def static_params(workers: int) -> dict[str, object]:
    """Settings that do not depend on the node the server runs on."""
    return {
        "max_connections": max_connections(workers),
        "superuser_reserved_connections": SUPERUSER_SLOTS,
        "password_encryption": AUTH,
        "listen_addresses": "",
        "unix_socket_permissions": "0700",
        "log_destination": "stderr",
        "logging_collector": False,
        "log_line_prefix": "%m [%p] %q%u@%d ",
        "log_connections": False,
        "log_min_messages": "warning",
        "log_timezone": "UTC",
        "timezone": "UTC",
    }


MB = 1024 * 1024


def memory_params(memory_bytes: int) -> dict[str, object]:
    """shared_buffers at about 25 % of what the job may use (128 MB to 8 GB), and the
    planner told how much the OS will cache for us."""
    shared = min(max(memory_bytes // 4, 128 * MB), 8192 * MB)
    return {"shared_buffers": f"{shared // MB}MB",
            "effective_cache_size": f"{max(memory_bytes // 2, shared) // MB}MB"}


def node_params(*, port: int, listen: str, socket_dir: str, memory_bytes: int) -> dict:
    """Settings computed for the node a server starts on."""
    return {"port": port, "listen_addresses": listen, "unix_socket_directories": socket_dir,
            **memory_params(memory_bytes)}


def ensure_include(postgresql_conf: Path) -> str | None:
    """postgresql.conf text with our include line appended once, or None if already there."""
    text = postgresql_conf.read_text()
    if INCLUDE_LINE in text.splitlines():
        return None
    return text.rstrip("\n") + "\n\n" + INCLUDE_LINE + "\n"


@dataclass(frozen=True)
class Access:
    database: str
    user: str
    superuser: str
    networks: tuple[str, ...]


def hba_name(name: str) -> str:
    """A database or role name as pg_hba.conf (and pgbouncer's hba file) take it literally:
    double-quoted, a quote inside doubled, so no keyword (all, replication, ...) or prefix
    (+, @, /) applies. The name itself was checked where settings enter (settings.Settings)."""
    return '"' + name.replace('"', '""') + '"'


def hba_block(access: Access) -> str:
    """Our pg_hba lines: the app role over TLS from the allowed networks, the superuser only
    over the Unix socket, scram-sha-256 everywhere, and everything else rejected."""
    db, user, superuser = (hba_name(n) for n in (access.database, access.user,
                                                 access.superuser))
    rows = [("local", "all", superuser, "", AUTH),
            ("local", db, user, "", AUTH)]
    for net in access.networks:  # TLS only: a plain-text connection matches no line here
        rows.append(("hostssl", db, user, net, AUTH))
    rows += [("local", "all", "all", "", "reject"),
             ("host", "all", "all", "0.0.0.0/0", "reject"),
             ("host", "all", "all", "::/0", "reject")]
    body = "".join(f"{t:<7} {db:<12} {user:<12} {addr:<20} {method}\n".replace("  \n", "\n")
                   for t, db, user, addr, method in rows)
    return f"{HBA_BEGIN}\n{body}{HBA_END}\n"


def merge_hba(existing: str | None, block: str) -> str:
    """pg_hba.conf with our block replaced in place, or put first when it is not there.

    pg_hba is first-match: our block ends with reject-all, so a line of the user's only
    takes effect above the block. With no file yet (fresh initdb), only our block is kept:
    initdb's defaults would allow more than pgjob promises.
    """
    if existing is None:
        return "# pg_hba.conf: lines above pgjob's block take precedence over it\n" + block
    lines = existing.splitlines(keepends=True)
    try:
        start = next(i for i, l in enumerate(lines) if l.strip() == HBA_BEGIN)
        end = next(i for i in range(start, len(lines)) if lines[i].strip() == HBA_END)
    except StopIteration:
        return block + "".join(lines)
    return "".join(lines[:start]) + block + "".join(lines[end + 1:])
