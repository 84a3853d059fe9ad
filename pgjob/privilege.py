"""The door for pgjob started as root: pick the account, become it, and only then go on.

PostgreSQL refuses to run as root, and a root process that works inside a home another
account can write is a root process that account can steer (a symlink in logs/ makes root
chown or append to any file). So the CLI, started as root, resolves the account the home
belongs to (or the one named with --run-as, for a new home) and drops to it for good
(groups, gid, uid) before anything reads or writes the home. Code below this door never asks "am I root?".
"""
from __future__ import annotations

import importlib.util
import os
import pwd
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .home import resolve_path

DEFAULT_RUN_AS = "postgres"


@dataclass(frozen=True)
class Account:
    """An unprivileged OS account that pgjob, started as root, acts as."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def named(cls, name: str) -> "Account":
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise UsageError(
                "PostgreSQL refuses to run as root, and there is no account "
                f"{name!r} to run it as; create one (useradd -m pgjob) and pass "
                "--run-as pgjob, or run pgjob as a normal user") from None
        if entry.pw_uid == 0:
            raise UsageError(f"--run-as {name} is root; PostgreSQL refuses to run as root: "
                             "name an unprivileged account")
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    @classmethod
    def of_uid(cls, uid: int) -> "Account":
        try:
            return cls.named(pwd.getpwuid(uid).pw_name)
        except KeyError:
            raise UsageError(f"the home belongs to uid {uid}, which has no account on this "
                             "machine; run pgjob as its owner") from None

    def groups(self) -> list[int]:
        return os.getgrouplist(self.name, self.gid)


def is_root() -> bool:
    return os.geteuid() == 0


def account_for(path: Path, run_as: str = "") -> Account:
    """The account a root-started pgjob acts as for the home at `path`.

    An existing home's owner, always: a home names no other account, so a run_as setting
    written by that owner cannot send root to act as somebody else. A new home: --run-as,
    else the distribution's postgres account.
    """
    if path.exists():
        owner = path.stat().st_uid
        if owner == 0:
            raise UsageError(f"{path} belongs to root, and PostgreSQL refuses to run as root; "
                             "remove it, or give it to the account the server should run as "
                             f"(chown ACCOUNT {path})")
        account = Account.of_uid(owner)
        if run_as and run_as != account.name:
            raise UsageError(f"--run-as {run_as}, but {path} belongs to {account.name}; a home "
                             f"runs as its owner: drop --run-as or use --run-as {account.name}")
        return account
    return Account.named(run_as or DEFAULT_RUN_AS)


WRITE = (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH)
ENTER = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)


def _may(st: os.stat_result, account: Account, bits: tuple[int, int, int]) -> bool:
    """Whether `account` has the (user, group, other) permission `bits` on a stat result."""
    if st.st_uid == account.uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in account.groups():
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


def check_reachable(path: Path, account: Account) -> None:
    """Every existing folder above `path` must let the account pass."""
    for ancestor in reversed(path.parents):
        if not ancestor.exists():
            break
        if not _may(ancestor.stat(), account, ENTER):
            raise UsageError(
                f"the server runs as {account.name}, who cannot enter {ancestor}; choose a "
                f"--home that {account.name} can reach (e.g. under /var/tmp or its own home "
                "directory), or run pgjob as that user")


def check_creatable(path: Path, account: Account) -> None:
    """A new home must be one the account can make itself: root makes nothing for it, since
    a folder made by root inside a place the account controls is a folder it steered."""
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if existing == path:
        return
    st = existing.stat()
    if not (_may(st, account, WRITE) and _may(st, account, ENTER)):
        raise UsageError(
            f"the server runs as {account.name}, who cannot create {path} ({existing} is not "
            f"writable by {account.name}); make the folder for it first (install -d -o "
            f"{account.name} -m 700 {path}), or choose a --home under a folder "
            f"{account.name} can write")


def become(account: Account) -> None:
    """Drop root for good: supplementary groups, then gid, then uid."""
    os.setgroups(account.groups())
    os.setgid(account.gid)
    os.setuid(account.uid)
    os.environ.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
    _check_install_usable(account)


def _check_install_usable(account: Account) -> None:
    """pgjob goes on importing (and starting Python) as the account: say so now if the
    account cannot read the installation, rather than failing half-way."""
    places = [Path(sys.executable)]
    for name in ("pgjob", "optuna", "psycopg"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            places.append(Path(spec.origin).parent)
    for place in places:
        if not os.access(place, os.R_OK | os.X_OK):
            raise UsageError(
                f"pgjob was started as root and acts as {account.name}, who cannot use "
                f"{place}; install pgjob where {account.name} can run it (e.g. a venv made "
                f"with /usr/bin/python3 under /opt), or run pgjob as {account.name}")


def enter(home_option, run_as: str = "", *, create: bool = False) -> Path:
    """The home's path, after becoming its account when started as root (checking first,
    when `create`, that the account can make the home there)."""
    path = resolve_path(home_option)
    if is_root():
        account = account_for(path, run_as)
        if create:
            check_reachable(path, account)
            check_creatable(path, account)
        become(account)
    return path


def enter_as(run_as: str = "") -> Account | None:
    """For commands without a home (the demo): as root, become `run_as` (default postgres)."""
    if not is_root():
        return None
    account = Account.named(run_as or DEFAULT_RUN_AS)
    become(account)
    return account
