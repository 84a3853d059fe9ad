"""The instance home on the shared filesystem: its layout, its files' modes, pgjob's settings.

Everything pgjob writes into a home goes through `Home.write`, which writes atomically,
sets the mode, and, when pgjob runs as root on behalf of another account, hands the file
to the home's owner.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pwd
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .proc import Account

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SETTINGS_NAME = "pgjob.toml"
DEFAULT_RUN_AS = "postgres"


@dataclass(frozen=True)
class Settings:
    """pgjob's own settings for one instance, kept in the home's pgjob.toml."""

    port: int = 5432
    workers: int = 64
    database: str = "optuna"
    user: str = "optuna"
    superuser: str = "postgres"
    allow: tuple[str, ...] = ()  # empty: the networks of the serving node's interfaces
    pg_bin: str = ""
    run_as: str = ""
    heartbeat_interval: int = 30  # seconds between a running trial's heartbeats
    grace_period: int = 120  # a RUNNING trial silent this long is failed (and retried)
    backup_interval: int = 3600  # seconds between backups while serving; 0: only at stop
    backups_keep: int = 5
    pooler: str = ""  # "pgbouncer": clients reach the server through it (hundreds of workers)
    # Where the scheduler sends no signal before the time limit (PBS), serve stops itself
    # this many seconds before the job's end.
    stop_margin: int = 300
    # Seconds the home's lease stays valid without renewal (see lease.py); a serve whose
    # job was killed outright is taken over at most lease_ttl + 10 s later.
    lease_ttl: int = 30

    @classmethod
    def from_mapping(cls, values: dict) -> "Settings":
        known = {f.name: f for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in values.items():
            if key not in known:
                continue
            if key == "allow":
                value = tuple(value.split(",") if isinstance(value, str) else value)
                value = tuple(v.strip() for v in value if v.strip())
            elif known[key].type == "int":
                try:
                    value = int(value)
                except (TypeError, ValueError):
                    raise UsageError(f"setting {key!r} must be a whole number, got {value!r}; "
                                     f"fix it in {SETTINGS_NAME} or the PGJOB_{key.upper()} "
                                     "variable") from None
            if key == "lease_ttl" and not 10 <= value <= 3600:
                raise UsageError(f"setting 'lease_ttl' must be between 10 and 3600 seconds, "
                                 f"got {value}; fix it in {SETTINGS_NAME} or PGJOB_LEASE_TTL")
            clean[key] = value
        return cls(**clean)

    def to_toml(self) -> str:
        lines = ["# pgjob settings for this instance (written by `pgjob init`; edit, then",
                 "# run `pgjob init` again to apply). PGJOB_<NAME> variables override these."]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            rendered = json.dumps(list(value) if isinstance(value, tuple) else value)
            lines.append(f"{f.name} = {rendered}")
        return "\n".join(lines) + "\n"


def resolve_path(option: str | os.PathLike | None) -> Path:
    """The home named by --home, else $PGJOB_HOME, else ~/.pgjob/default."""
    raw = option or os.environ.get("PGJOB_HOME") or "~/.pgjob/default"
    return Path(raw).expanduser().absolute()


@dataclass
class Home:
    path: Path
    owner: Account | None = field(default=None)

    # The layout, in one place.
    @property
    def settings_file(self) -> Path: return self.path / SETTINGS_NAME
    @property
    def data(self) -> Path: return self.path / "data"
    @property
    def secrets(self) -> Path: return self.path / "secrets"
    @property
    def logs(self) -> Path: return self.path / "logs"
    @property
    def run(self) -> Path: return self.path / "run"
    @property
    def app_passfile(self) -> Path: return self.secrets / "app.pgpass"
    @property
    def superuser_passfile(self) -> Path: return self.secrets / "superuser.pgpass"
    @property
    def endpoint_file(self) -> Path: return self.path / "endpoint.json"
    @property
    def serve_record(self) -> Path: return self.run / "serve.json"
    @property
    def stop_request(self) -> Path: return self.run / "stop-request"
    @property
    def server_log(self) -> Path: return self.logs / "postgresql.log"
    @property
    def submitted(self) -> Path: return self.run / "submitted.json"
    @property
    def lease_file(self) -> Path: return self.run / "lease.json"
    @property
    def successor(self) -> Path: return self.run / "successor.json"
    @property
    def backups(self) -> Path: return self.path / "backups"

    def is_home(self) -> bool:
        return self.settings_file.is_file()

    def require(self) -> "Home":
        """Fail with what to do when this directory is not an initialized home."""
        if not self.path.exists():
            raise UsageError(f"no pgjob home at {self.path}; create one with "
                             f"`pgjob init --home {self.path}` (or set PGJOB_HOME)")
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise UsageError(f"cannot read the pgjob home {self.path}: permission denied; "
                             "run pgjob as the account that owns it")
        if not self.is_home():
            raise UsageError(f"{self.path} is not a pgjob home (no {SETTINGS_NAME}); "
                             f"create one with `pgjob init --home {self.path}`")
        return self

    def private_paths(self) -> list[Path]:
        """Everything in the home that only its owner may read: the folders, the secrets,
        the settings and the endpoint (the data directory is PostgreSQL's own 0700)."""
        paths = [self.path, self.secrets, self.logs, self.run, self.backups, self.data,
                 self.settings_file, self.endpoint_file]
        if self.secrets.is_dir():
            paths += sorted(self.secrets.iterdir())
        if self.backups.is_dir():
            paths += sorted(self.backups.iterdir())
        return [p for p in paths if p.exists()]

    def loose_modes(self) -> list[tuple[Path, int]]:
        """Private paths that group or others may read, write or enter."""
        loose = []
        for path in self.private_paths():
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                loose.append((path, mode))
        return loose

    def tighten(self) -> None:
        for path, mode in self.loose_modes():
            os.chmod(path, mode & 0o700)

    def settings(self) -> Settings:
        """Settings from pgjob.toml, overridden by PGJOB_<NAME> environment variables."""
        try:
            values = tomllib.loads(self.settings_file.read_text())
        except FileNotFoundError:
            values = {}
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{self.settings_file} is not valid TOML ({exc}); fix or delete "
                             "it, then run `pgjob init` again") from None
        for f in dataclasses.fields(Settings):
            env = os.environ.get(f"PGJOB_{f.name.upper()}")
            if env is not None:
                values[f.name] = env
        return Settings.from_mapping(values)

    def save_settings(self, settings: Settings) -> None:
        self.write(self.settings_file, settings.to_toml())

    def mkdir(self, path: Path, mode: int = 0o700) -> None:
        path.mkdir(mode=mode, parents=False, exist_ok=True)
        os.chmod(path, mode)
        self.give(path)

    def write(self, path: Path, text: str, mode: int = 0o600) -> None:
        """Replace `path` atomically: temp file in the same directory, fsync, rename."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, mode)
            self.give(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def ensure_file(self, path: Path, mode: int = 0o600) -> Path:
        """Create `path` empty if it is missing (a log, say), owned like the rest of the home."""
        if not path.exists():
            self.write(path, "", mode)
        return path

    def give(self, path: Path) -> None:
        if self.owner is not None and self.owner.uid != os.geteuid():
            os.chown(path, self.owner.uid, self.owner.gid)


def choose_account(path: Path, run_as: str = "") -> Account | None:
    """The account PostgreSQL runs as: None (ourselves) unless pgjob runs as root.

    PostgreSQL refuses to run as root. As root we run its programs as `run_as`, else the
    owner of an existing home, else the distribution's `postgres` account.
    """
    if os.geteuid() != 0:
        return None
    name = run_as
    if not name and path.exists() and path.stat().st_uid != 0:
        name = pwd.getpwuid(path.stat().st_uid).pw_name
    name = name or DEFAULT_RUN_AS
    try:
        account = Account.named(name)
    except KeyError:
        raise UsageError(
            "PostgreSQL refuses to run as root, and there is no account "
            f"{name!r} to run it as; create one (useradd -m pgjob) and pass "
            "--run-as pgjob, or run pgjob as a normal user") from None
    if account.uid == 0:
        raise UsageError(f"--run-as {name} is root; PostgreSQL refuses to run as root: "
                         "name an unprivileged account")
    return account


def open_home(option: str | os.PathLike | None, run_as: str = "", *,
              server: bool = False) -> Home:
    """The home for a command; for commands that run PostgreSQL (`server`), with the
    account that owns its files when we are root."""
    path = resolve_path(option)
    home = Home(path)
    if server and os.geteuid() == 0:
        configured = run_as
        if not configured and home.is_home():
            configured = home.settings().run_as
        home.owner = choose_account(path, configured)
    return home
