"""The instance home on the shared filesystem: its layout, its files' modes, pgjob's settings.

Everything pgjob writes into a home goes through `Home.write`, which writes atomically
with the final mode. pgjob started as root has already become the home's account (see
privilege.py), so nothing here acts for anybody else. Everything that reads a home first
checks, in `Home.check_trusted`, that nobody else made or could have changed what decides
which server it trusts.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import pwd
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger("pgjob.home")

SETTINGS_NAME = "pgjob.toml"
ENV_PREFIX = "PGJOB_"  # PGJOB_<NAME> overrides a setting; its value is always text
DEFAULT_SOURCE = "the default"
WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _account_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _not_yours(path: Path, st: os.stat_result) -> UsageError:
    owner = _account_name(st.st_uid)
    return UsageError(
        f"this home is not yours: {path} belongs to {owner} (mode "
        f"{stat.S_IMODE(st.st_mode):04o}), so {owner} decides which server pgjob would "
        f"connect you to. If you trust {owner} with your study, run pgjob as {owner}; "
        "otherwise choose your own --home (or PGJOB_HOME), in a folder only you can write")


def _writable(path: Path, st: os.stat_result) -> UsageError:
    return UsageError(
        f"{path} can be changed by other users (owner {_account_name(st.st_uid)}, mode "
        f"{stat.S_IMODE(st.st_mode):04o}), so someone may have pointed this home at another "
        f"server. If you trust everyone who can write it, remove their access (chmod go-w "
        f"{path}), then run `pgjob init` to check the home; otherwise choose your own "
        "--home (or PGJOB_HOME), in a folder only you can write")


def _a_link(path: Path) -> UsageError:
    return UsageError(
        f"{path} is a symbolic link (to {os.readlink(path)}); pgjob keeps its own file "
        "there and follows no link in a home. If you made it, replace it with the file "
        "itself; otherwise choose your own --home (or PGJOB_HOME), in a folder only you "
        "can write")


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
    # How studies are kept: "rdb" (Optuna's RDBStorage tables; `pgjob url` works for any
    # Optuna client) or "journal" (Optuna's JournalStorage, logs in pgjob's table; faster,
    # through `pgjob.optuna_storage()` only). All workers of a home must agree.
    storage: str = "rdb"

    @classmethod
    def from_mapping(cls, values: Mapping[str, object],
                     sources: Mapping[str, str] | None = None) -> "Settings":
        """Typed, checked settings from raw values (pgjob.toml, PGJOB_<NAME>, options).

        The one door every setting comes in by: each value is checked against its rule
        and normalized, or refused with a UsageError that names the setting, where it
        came from (`sources`, e.g. "PGJOB_ALLOW" or "--port") and what is accepted.
        Everything after this trusts the values; the renderers only quote them.
        Unknown keys are ignored with a warning (a typo would otherwise be silent).
        """
        sources = sources or {}
        known = {f.name: f for f in dataclasses.fields(cls)}
        clean = {}
        for name, value in values.items():
            where = sources.get(name, SETTINGS_NAME)
            if name not in known:
                _warn_unknown(name, where)
                continue
            check = RULES.get(name) or _by_default_type(known[name].default)
            try:
                clean[name] = check(value, where.startswith(ENV_PREFIX))
            except Refused as form:
                raise refusal(name, value, where, str(form)) from None
        settings = cls(**clean)
        _check_together(settings, lambda name: sources.get(name, SETTINGS_NAME)
                        if name in values else DEFAULT_SOURCE)
        return settings

    def to_toml(self) -> str:
        lines = ["# pgjob settings for this instance (written by `pgjob init`; edit, then",
                 "# run `pgjob init` again to apply). PGJOB_<NAME> variables override these."]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            rendered = json.dumps(list(value) if isinstance(value, tuple) else value)
            lines.append(f"{f.name} = {rendered}")
        return "\n".join(lines) + "\n"


# The rules every setting is checked by, in Settings.from_mapping and nowhere else.

MAX_WORKERS = 10_000  # max_connections (2N + 8) stays far inside PostgreSQL's limit
MAX_SECONDS = 366 * 86400  # no interval or margin needs more than a year
POOLERS = ("", "none", "pgbouncer")
STORAGES = ("rdb", "journal")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
ACCOUNT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")
WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
# Names PostgreSQL refuses for a role, and databases that exist (or, behind pgbouncer,
# mean its console) before pgjob makes its own.
RESERVED_ROLES = ("public", "none")
RESERVED_DATABASES = ("postgres", "template0", "template1", "pgbouncer")
IDENTIFIER_FORM = ("a name of 1 to 63 letters (a-z, A-Z), digits and underscores, not "
                   "starting with a digit")
NETWORKS_FORM = ('networks like "10.1.0.0/16" or addresses like "10.1.2.3" (no %zone), as a '
                 'list or one comma-separated string (empty: the serving node\'s networks)')


class Refused(ValueError):
    """A raw value its setting does not accept; the message is the form it must have."""


# A rule: (raw value, whether it came as text from the environment) -> the typed value.
Rule = Callable[[object, bool], object]


def whole(low: int, high: int) -> Rule:
    """A whole number in [low, high]; from the environment, its decimal text."""
    def check(value: object, text: bool) -> int:
        if text and isinstance(value, str) and WHOLE_NUMBER.fullmatch(value.strip()):
            value = int(value)
        # bool is an int to Python but never to a user: `port = true` is a mistake
        if type(value) is not int or not low <= value <= high:
            raise Refused(f"a whole number from {low} to {high}")
        return value
    return check


def role_name(value: object, text: bool) -> str:
    """A role pg_hba.conf, pgbouncer and SQL all read the same way, quoted or not."""
    name = _identifier(value)
    if name.lower() in RESERVED_ROLES or name.lower().startswith("pg_"):
        raise Refused(f"{IDENTIFIER_FORM}, and not one PostgreSQL reserves "
                      f"({', '.join(RESERVED_ROLES)} or pg_...)")
    return name


def database_name(value: object, text: bool) -> str:
    name = _identifier(value)
    if name.lower() in RESERVED_DATABASES:
        raise Refused(f"{IDENTIFIER_FORM}, and not one that exists already or means "
                      f"pgbouncer's console ({', '.join(RESERVED_DATABASES)})")
    return name


def _identifier(value: object) -> str:
    if not isinstance(value, str) or not IDENTIFIER.fullmatch(value):
        raise Refused(IDENTIFIER_FORM)
    return value


def networks(value: object, text: bool) -> tuple[str, ...]:
    """Networks in PostgreSQL's CIDR form: a bare address becomes a one-host network,
    host bits are cleared, duplicates dropped; anything else is refused, so no stray word
    (`trust`, `#`) ever reaches pg_hba.conf."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise Refused(NETWORKS_FORM)
    found = []
    for item in filter(None, (i.strip() for i in items)):
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise Refused(NETWORKS_FORM) from None
        # Python keeps an IPv6 %zone as free text, spaces and all; pg_hba takes none.
        if getattr(net.network_address, "scope_id", None) is not None:
            raise Refused(NETWORKS_FORM)
        found.append(str(net))
    return tuple(dict.fromkeys(found))


def account_name(value: object, text: bool) -> str:
    if not isinstance(value, str) or value and not ACCOUNT_NAME.fullmatch(value):
        raise Refused("an account name (letters, digits, '_', '.', '-', up to 32, starting "
                      "with a letter or '_'), or empty")
    return value


def plain_text(value: object, text: bool) -> str:
    if not isinstance(value, str) or CONTROL_CHARACTER.search(value):
        raise Refused("text without control characters (such as a newline)")
    return value


def pooler_kind(value: object, text: bool) -> str:
    if not isinstance(value, str) or value not in POOLERS:
        raise Refused("one of " + ", ".join(f'"{k}"' for k in POOLERS))
    return value


def storage_kind(value: object, text: bool) -> str:
    if not isinstance(value, str) or value not in STORAGES:
        raise Refused("one of " + ", ".join(f'"{k}"' for k in STORAGES))
    return value


RULES: dict[str, Rule] = {
    "port": whole(1, 65535),
    "workers": whole(1, MAX_WORKERS),
    "database": database_name,
    "user": role_name,
    "superuser": role_name,
    "allow": networks,
    "pg_bin": plain_text,
    "run_as": account_name,
    "heartbeat_interval": whole(1, MAX_SECONDS),
    "grace_period": whole(1, MAX_SECONDS),  # and more than heartbeat_interval, below
    "backup_interval": whole(0, MAX_SECONDS),
    "backups_keep": whole(1, 10_000),  # 0 would delete every backup, the new one too
    "pooler": pooler_kind,
    "stop_margin": whole(0, MAX_SECONDS),
    "lease_ttl": whole(10, 3600),
    "storage": storage_kind,
}


def _by_default_type(default: object) -> Rule:
    """For a setting that has no rule of its own yet: at least its type."""
    return whole(0, MAX_SECONDS) if isinstance(default, int) else plain_text


def _check_together(settings: Settings, where: Callable[[str], str]) -> None:
    """The rules that tie two settings together; the one named is the one that was set."""
    if settings.user == settings.superuser:
        name, other = (("superuser", "user") if where("user") == DEFAULT_SOURCE
                       else ("user", "superuser"))
        _conflict(settings, where, name, f"another name than {other}", other,
                  "as the application role must not be the superuser")
    if settings.grace_period <= settings.heartbeat_interval:
        if where("grace_period") == DEFAULT_SOURCE:
            _conflict(settings, where, "heartbeat_interval", "less than grace_period",
                      "grace_period", "else every running trial would be failed")
        _conflict(settings, where, "grace_period", "more than heartbeat_interval",
                  "heartbeat_interval", "else every running trial would be failed")


def _conflict(settings: Settings, where: Callable[[str], str], name: str, form: str,
              other: str, why: str) -> None:
    raise refusal(name, getattr(settings, name), where(name),
                  f"{form} ({getattr(settings, other)!r}, from {where(other)}), {why}")


def refusal(name: str, value: object, where: str, form: str) -> UsageError:
    """The one-line error for a refused setting: which, from where, and what it must be."""
    shown = repr(list(value) if isinstance(value, tuple) else value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return UsageError(f"setting {name} = {shown} from {where} is refused: it must be "
                      f"{form}; fix {where}")


_warned: set[tuple[str, str]] = set()


def _warn_unknown(name: str, where: str) -> None:
    """Once per process: an unknown key is most often a misspelt one."""
    if (name, where) not in _warned:
        _warned.add((name, where))
        known = ", ".join(f.name for f in dataclasses.fields(Settings))
        log.warning("%s: unknown setting %r ignored (known: %s)", where, name, known)


def resolve_path(option: str | os.PathLike | None) -> Path:
    """The home named by --home, else $PGJOB_HOME, else ~/.pgjob/default."""
    raw = option or os.environ.get("PGJOB_HOME") or "~/.pgjob/default"
    return Path(raw).expanduser().absolute()


@dataclass
class Home:
    path: Path

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
    def pending_passfile(self) -> Path: return self.secrets / "app.pgpass.pending"
    @property
    def superuser_passfile(self) -> Path: return self.secrets / "superuser.pgpass"
    @property
    def journal_key(self) -> Path: return self.secrets / "journal.key"  # signs snapshots
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
        self.check_trusted()
        return self

    def trusted_uids(self) -> set[int]:
        """Whose files a home of ours may hold: ours and root's. Root acts for the home's
        (non-root) account, so for root that account's as well."""
        me = os.geteuid()
        return {me, 0, self.path.stat().st_uid} if me == 0 else {me, 0}

    def guarded_paths(self) -> list[Path]:
        """What decides which server a client trusts and with which password (and which
        programs serve runs): the settings, the secrets, run/ and the endpoint."""
        paths = [self.settings_file, self.secrets, self.run, self.endpoint_file]
        for folder in (self.secrets, self.run):
            try:
                if stat.S_ISDIR(folder.lstat().st_mode):
                    paths += sorted(folder.iterdir())
            except OSError:  # missing, or not ours to list: the folder itself is refused
                pass
        return [p for p in paths if os.path.lexists(p)]

    def check_trusted(self, *, new: bool = False) -> None:
        """Refuse a home that someone else made or could have changed.

        In a folder others can write (a group project folder, /tmp without the sticky
        bit), another user can put a home of theirs where ours was, and its endpoint and
        CA would send us to their server. So the home must belong to us (or root) and be
        writable by nobody else, and the paths that decide whom we trust must be our own
        files, not links. `new`: init is about to make a folder of ours the home (and make
        it 0700), so only its owner counts there. Read access for others is not refused:
        `pgjob status` warns of it and `pgjob init` repairs it.
        """
        if not self.path.exists():
            return  # nothing there to trust, nor to read
        uids = self.trusted_uids()
        st = self.path.stat()
        if st.st_uid not in uids:
            raise _not_yours(self.path, st)
        if st.st_mode & WRITABLE_BY_OTHERS and not new:
            raise _writable(self.path, st)
        for path in self.guarded_paths():
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue  # gone since listed (a lease being written): it can mislead no one
            if stat.S_ISLNK(st.st_mode):
                raise _a_link(path)
            if st.st_uid not in uids:
                raise _not_yours(path, st)
            if st.st_mode & WRITABLE_BY_OTHERS:
                raise _writable(path, st)

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

    def raw_settings(self) -> tuple[dict, dict[str, str]]:
        """The settings as given, unchecked: pgjob.toml's values overridden by PGJOB_<NAME>
        variables, and where each one came from (for Settings.from_mapping's messages)."""
        try:
            values = tomllib.loads(self.settings_file.read_text())
        except FileNotFoundError:
            values = {}
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{self.settings_file} is not valid TOML ({exc}); fix or delete "
                             "it, then run `pgjob init` again") from None
        except OSError as exc:
            raise UsageError(f"cannot read {self.settings_file}: {exc.strerror}; run pgjob "
                             "as the account that owns the home") from None
        sources = dict.fromkeys(values, str(self.settings_file))
        for f in dataclasses.fields(Settings):
            variable = ENV_PREFIX + f.name.upper()
            if variable in os.environ:
                values[f.name], sources[f.name] = os.environ[variable], variable
        return values, sources

    def settings(self) -> Settings:
        """Settings from pgjob.toml, overridden by PGJOB_<NAME> environment variables."""
        return Settings.from_mapping(*self.raw_settings())

    def save_settings(self, settings: Settings) -> None:
        self.write(self.settings_file, settings.to_toml())

    def mkdir(self, path: Path, mode: int = 0o700) -> None:
        """One of the home's own folders, with `mode`; a link or a file in its place is
        refused, never followed."""
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise UsageError(f"{path} is not a folder (a link or a file stands there); pgjob "
                             "keeps its own folder at that place: move it away, then run "
                             "`pgjob init` again")
        os.chmod(path, mode)

    def write(self, path: Path, text: str, mode: int = 0o600) -> None:
        """Replace `path` atomically: temp file in the same directory, fsync, rename."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.fchmod(fd, mode)  # its final mode before a byte is in it
            with os.fdopen(fd, "w") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_folder(path.parent)

    def ensure_file(self, path: Path, mode: int = 0o600) -> Path:
        """Create `path` empty if it is missing (a log, say)."""
        if not path.exists():
            self.write(path, "", mode)
        return path


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (the folder's own entry list)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_home(option: str | os.PathLike | None) -> Home:
    """The home named by --home, $PGJOB_HOME or the default."""
    return Home(resolve_path(option))
