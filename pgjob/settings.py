"""pgjob's own settings for one home: what each may be, where each came from, read once.

Settings come from the home's pgjob.toml, overridden by PGJOB_<NAME> environment
variables, and for `pgjob init` by its options. `Settings.from_mapping` is the one door
they come in by: every value is checked by its rule there, and nothing after it judges
them again (conf.py's renderers only quote).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger("pgjob.settings")

SETTINGS_NAME = "pgjob.toml"
ENV_PREFIX = "PGJOB_"  # PGJOB_<NAME> overrides a setting; its value is always text
DEFAULT_SOURCE = "the default"


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


def read_raw(settings_file: Path) -> tuple[dict, dict[str, str]]:
    """The settings as given, unchecked: pgjob.toml's values overridden by PGJOB_<NAME>
    variables, and where each one came from (for Settings.from_mapping's messages)."""
    try:
        values = tomllib.loads(settings_file.read_text())
    except FileNotFoundError:
        values = {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{settings_file} is not valid TOML ({exc}); fix or delete "
                         "it, then run `pgjob init` again") from None
    except OSError as exc:
        raise UsageError(f"cannot read {settings_file}: {exc.strerror}; run pgjob "
                         "as the account that owns the home") from None
    sources = dict.fromkeys(values, str(settings_file))
    for f in dataclasses.fields(Settings):
        variable = ENV_PREFIX + f.name.upper()
        if variable in os.environ:
            values[f.name], sources[f.name] = os.environ[variable], variable
    return values, sources


def given(settings_file: Path) -> tuple:
    """What the settings are read from, cheaply compared: the file's identity and change
    time, and the PGJOB_<NAME> variables set now."""
    try:
        st = settings_file.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    names = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    return stamp, tuple(sorted((k, v) for k, v in os.environ.items() if k in names))


def load(settings_file: Path, **options) -> Settings:
    """The checked settings of a home: pgjob.toml, PGJOB_<NAME>, and the options given
    on this command line (those not None or empty) on top, all checked together."""
    values, sources = read_raw(settings_file)
    for name, value in options.items():
        if value not in (None, ()):
            values[name], sources[name] = value, "--" + name.replace("_", "-")
    return Settings.from_mapping(values, sources)
