"""The instance home on the shared filesystem: its layout, its records, its files' modes.

Everything pgjob writes into a home goes through `Home.write`, which writes atomically
with the final mode. pgjob started as root has already become the home's account (see
privilege.py), so nothing here acts for anybody else. Everything that reads a home first
checks, in `Home.check_trusted`, that nobody else made or could have changed what decides
which server it trusts.
"""
from __future__ import annotations

import json
import os
import pwd
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import settings as settings_module
from .errors import UsageError
from .settings import SETTINGS_NAME, Settings

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


def resolve_path(option: str | os.PathLike | None) -> Path:
    """The home named by --home, else $PGJOB_HOME, else ~/.pgjob/default."""
    raw = option or os.environ.get("PGJOB_HOME") or "~/.pgjob/default"
    return Path(raw).expanduser().absolute()


def json_object(text: str | bytes) -> dict:
    """A JSON object from a file pgjob keeps; ValueError for anything else, also for
    nesting so deep that the parser gives up (a RecursionError from json, which a
    damaged or planted file must not turn into a traceback)."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to be one of pgjob's records") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


@dataclass
class Home:
    path: Path
    _settings: tuple | None = field(default=None, init=False, repr=False, compare=False)

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
    def ca_cert(self) -> Path: return self.secrets / "ca.crt"  # the home's own CA
    @property
    def ca_key(self) -> Path: return self.secrets / "ca.key"
    @property
    def server_cert(self) -> Path: return self.data / "server.crt"  # this node's, from the CA
    @property
    def server_key(self) -> Path: return self.data / "server.key"
    @property
    def server_cert_record(self) -> Path: return self.data / "server.crt.json"
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
    def pooler_log(self) -> Path: return self.logs / "pgbouncer.log"
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

    def settings(self) -> Settings:
        """This home's checked settings (pgjob.toml, PGJOB_<NAME>), parsed and checked once
        per Home while neither the file nor those variables change: a command opens its
        home once and passes the Home (and so them) down."""
        given = settings_module.given(self.settings_file)
        if self._settings is None or self._settings[0] != given:
            self._settings = (given, settings_module.load(self.settings_file))
        return self._settings[1]

    def save_settings(self, settings: Settings) -> None:
        self.write(self.settings_file, settings.to_toml())
        self._settings = (settings_module.given(self.settings_file), settings)

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

    def read_record(self, path: Path) -> dict:
        """One of the home's JSON records (serve.json, submitted.json, ...), or {} when it
        is missing, unreadable or not a JSON object: a record pgjob cannot read is one it
        does not have, never a crash."""
        try:
            return json_object(path.read_text())
        except (OSError, ValueError):
            return {}

    def write_record(self, path: Path, record: dict) -> None:
        """Replace one of the home's JSON records atomically (see `write`)."""
        self.write(path, json.dumps(record) + "\n")

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
