"""`pgjob export` and `pgjob import`: studies copied between a home and a file or another home.

A home's side is `pgjob.optuna_storage(home)`, RDBStorage or JournalStorage, whichever the
home is set to; the other side is a SQLite file, an Optuna journal file, or another home.
Optuna's own `copy_study` does the copying, one study at a time, so what is copied is what
Optuna copies: directions, study and trial attributes, parameters, values, intermediate
values, states and times.

The rules, for the user (docs/guide.md says the same):
- A study whose name the target already has is never merged into: nothing is copied, and
  the message names the studies.
- A study with RUNNING trials is refused unless asked for (`allow_running`): copied, such a
  trial stays RUNNING in the target, where no worker runs it and no server fails it.
- An existing file is told by its content (SQLite's header, else an Optuna journal); a
  new file's format comes from `--format`, else its name (FORMAT_BY_SUFFIX).
- A new file is written into a private folder (0700, made here) beside its final name and
  linked there only once complete: no link someone planted is followed, a name taken
  meanwhile is never overwritten, and a failed export leaves nothing behind. It is 0600,
  like a backup: it holds whole studies.
- Each study is copied whole or not at all (a failed one is deleted from the target); into
  a home or an existing file, those copied before a failure stay.
- An existing file is written to only if it is an Optuna storage, a regular file (not a
  link) and ours.
"""
from __future__ import annotations

import errno
import os
import pwd
import shutil
import sqlite3
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import PgJobError, UsageError, first_line
from .home import Home, fsync_folder, json_object, resolve_path

FORMATS = ("sqlite", "journal")
FORMAT_BY_SUFFIX = {".db": "sqlite", ".sqlite": "sqlite", ".sqlite3": "sqlite",
                    ".log": "journal", ".jsonl": "journal", ".journal": "journal"}
SQLITE_HEADER = b"SQLite format 3\x00"
OPTUNA_TABLES = {"studies", "trials", "version_info"}
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


@dataclass(frozen=True)
class Copied:
    study: str
    trials: int


# -- the file side ---------------------------------------------------------------------


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _me() -> str:
    """The account pgjob acts as (the home's owner, when started as root)."""
    return _owner(os.geteuid())


@dataclass(frozen=True)
class StudyFile:
    """A SQLite file or an Optuna journal file named on the command line."""

    path: Path
    format: str
    exists: bool

    @property
    def label(self) -> str:
        return str(self.path)


def study_file(spec: str, fmt: str = "", *, new: bool = True) -> StudyFile:
    """What `spec` (a path, or sqlite:///PATH) names, and in which format (see the module's
    rules); `new`: it may name a file still to be made. Nothing is written here."""
    path, from_url = _path_of(spec)
    if fmt and fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: use sqlite or journal")
    if from_url and fmt == "journal":
        raise UsageError(f"{spec} is a SQLite URL, but --format journal was given; drop one")
    want = "sqlite" if from_url else fmt
    st = _lstat(path)
    if st is not None:
        found = _format_of_existing(path, st)
        if want and want != found:
            raise UsageError(f"{path} is {_describe(found)}, not {_describe(want)} as "
                             f"--format {want} says; drop --format, or name another file")
        return StudyFile(path, found, exists=True)
    if not new:
        raise UsageError(f"no file at {path}; name a SQLite file or an Optuna journal file "
                         "that holds your studies (as written by Optuna or `pgjob export`)")
    guessed = want or FORMAT_BY_SUFFIX.get(path.suffix.lower(), "")
    if not guessed:
        known = ", ".join(FORMAT_BY_SUFFIX)
        raise UsageError(f"cannot tell from its name which kind of file {path} should be: "
                         f"add --format sqlite or --format journal (or name it with one of "
                         f"{known})")
    return StudyFile(path, guessed, exists=False)


def _path_of(spec: str) -> tuple[Path, bool]:
    if "://" in spec:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(spec)
        except ArgumentError:
            url = None
        if url is None or url.drivername != "sqlite" or not url.database or url.query:
            raise UsageError(
                f"{spec}: pgjob export and import take a SQLite file (results.db or "
                "sqlite:///results.db, without options), an Optuna journal file, or "
                "another home (--to-home, --from-home). For another database server, use "
                "optuna.copy_study with pgjob.optuna_storage() in Python")
        return Path(url.database).expanduser().absolute(), True
    return Path(spec).expanduser().absolute(), False


def _describe(fmt: str) -> str:
    return {"sqlite": "a SQLite file", "journal": "an Optuna journal file"}[fmt]


def _lstat(path: Path) -> os.stat_result | None:
    """The file's own status, None when there is no such file; a folder on the way that
    the account cannot enter is refused with what to do."""
    try:
        return path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _unreachable(path, exc) from None


def _unreachable(path: Path, exc: OSError) -> UsageError:
    return UsageError(f"cannot reach {path}: {exc.strerror}; pgjob runs as {_me()} here, so "
                      "choose a file and folder that account can use (or copy the file "
                      "there)")


def _format_of_existing(path: Path, st: os.stat_result) -> str:
    """SQLite or journal, from the file's first bytes; a link, a folder, an unreadable or
    empty file is refused with what to do."""
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"{path} is a symbolic link (to {os.readlink(path)}); pgjob follows "
                         "no link to a study file: name the file itself")
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path} is a folder; name a file in it, e.g. {path}/results.db")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file; name a SQLite or journal file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}; pgjob runs as {_me()} here, "
                         "so make the file readable to that account, or copy it somewhere "
                         "it can read") from None
    if not head:
        raise UsageError(f"{path} is empty, so holds no study; remove it (pgjob export makes "
                         "a new file itself), or name the file the studies are in")
    return "sqlite" if head == SQLITE_HEADER else "journal"


def _check_is_storage(file: StudyFile) -> None:
    """An existing file must already be an Optuna storage of its format."""
    if file.format == "sqlite":
        try:
            conn = sqlite3.connect(file.path.as_uri() + "?mode=ro", uri=True)
            try:
                tables = {row[0] for row in conn.execute(
                    "select name from sqlite_master where type = 'table'")}
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise UsageError(f"{file.path} is a damaged or locked SQLite file ({exc}); check "
                             "it with `sqlite3 FILE 'pragma integrity_check'`") from None
        if not OPTUNA_TABLES <= tables:
            raise UsageError(f"{file.path} is a SQLite database but no Optuna storage (it has "
                             "no Optuna tables); name the file your studies are in, or a new "
                             "file to export into")
        return
    with open(file.path, "rb") as f:
        first = f.readline()
    try:
        entry = json_object(first)
    except ValueError:  # UnicodeDecodeError too
        entry = {}
    if not ("op_code" in entry and "worker_id" in entry):
        raise UsageError(f"{file.path} is neither a SQLite database nor an Optuna journal "
                         "file (its first line is no journal entry); name the file your "
                         "studies are in, or a new file to export into")


def _sqlite_url(path: Path) -> str:
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=str(path)).render_as_string()  # any path, quoted


def _open_file_storage(path: Path, fmt: str, *, source: bool):
    if fmt == "sqlite":
        import optuna

        try:
            return optuna.storages.RDBStorage(_sqlite_url(path), skip_table_creation=source)
        except RuntimeError as exc:  # Optuna's schema check: an older or newer Optuna's file
            raise UsageError(f"{path}: {first_line(exc)}", detail=(
                "Upgrade a copy of the file with `optuna storage upgrade --storage "
                "sqlite:///COPY`, or use the Optuna that wrote it")) from None
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise UsageError(f"{path} could not be read as an Optuna journal ({first_line(exc)}); "
                         "it is damaged or is no journal: name the file your studies are "
                         "in") from None


def _close(storage) -> None:
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()
    backend = getattr(storage, "pgjob_backend", None)
    if backend is not None:
        backend.close()


class _FileSide:
    def __init__(self, file: StudyFile) -> None:
        self.file = file
        self.label = file.label
        self.all_or_nothing = not file.exists  # a new file is placed only when complete

    def check_source(self) -> None:
        _check_is_storage(self.file)

    def check_target(self) -> None:
        path = self.file.path
        if not self.file.exists:
            try:
                is_folder = path.parent.is_dir()  # a link to a folder is one, here
            except OSError as exc:
                raise _unreachable(path, exc) from None
            if not is_folder:
                raise UsageError(f"the folder {path.parent} does not exist; create it first, "
                                 "or name a file in an existing folder")
            return
        _check_is_storage(self.file)
        st = path.lstat()
        if st.st_uid != os.geteuid():
            raise UsageError(f"{path} belongs to {_owner(st.st_uid)}, not to {_me()}; pgjob "
                             "writes only into a study file of the account it runs as: "
                             "export into a new file")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{path} is not writable; make it writable (chmod u+w), or "
                             "export into a new file")

    @contextmanager
    def reading(self) -> Iterator:
        storage = _open_file_storage(self.file.path, self.file.format, source=True)
        try:
            yield storage
        finally:
            _close(storage)

    @contextmanager
    def writing(self) -> Iterator:
        if self.file.exists:
            storage = _open_file_storage(self.file.path, self.file.format, source=False)
            try:
                yield storage
            finally:
                _close(storage)
            return
        # A new file is made in a folder of our own beside its name, then linked there.
        final = self.file.path
        try:
            private = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        except OSError as exc:
            raise UsageError(f"cannot create {final}: {exc.strerror}; pgjob runs as {_me()} "
                             "here: choose a folder that account can write") from None
        try:
            work = private / final.name
            os.close(os.open(work, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o600))
            storage = _open_file_storage(work, self.file.format, source=False)
            try:
                yield storage
            finally:
                _close(storage)
            _place(work, final)
        finally:
            shutil.rmtree(private, ignore_errors=True)


def _place(work: Path, final: Path) -> None:
    """Give the finished file its name, never over anything that took the name meanwhile
    (a hard link fails on an existing name, link or not)."""
    try:
        os.link(work, final, follow_symlinks=False)
    except FileExistsError:
        raise UsageError(f"{final} appeared while the export ran (someone else made it); "
                         "nothing was written there: export again into a new file") from None
    except OSError as exc:
        if exc.errno not in NO_HARD_LINKS:
            raise UsageError(f"cannot create {final}: {exc.strerror}") from None
        if os.path.lexists(final):  # a filesystem without hard links: look, then rename
            raise UsageError(f"{final} appeared while the export ran; nothing was written "
                             "there: export again into a new file") from None
        os.rename(work, final)
    fsync_folder(final.parent)


# -- the home side ---------------------------------------------------------------------


class _HomeSide:
    def __init__(self, home: Home, wait: float) -> None:
        self.home = home
        self.wait = wait
        self.label = f"the home {home.path}"
        self.all_or_nothing = False

    def check_source(self) -> None:
        pass  # the home was checked when it was opened; its server is asked below

    check_target = check_source

    @contextmanager
    def _opened(self) -> Iterator:
        from . import endpoint
        from .storage import optuna_storage

        endpoint.wait_connectable(self.home, timeout=self.wait)  # a clear NotPublished
        # then a storage that waits, as workers' do, across a restart during the copy
        storage = optuna_storage(self.home.path, wait=max(self.wait, 60.0))
        try:
            yield storage
        finally:
            _close(storage)

    reading = writing = _opened


def other_home(option, home: Home) -> Home:
    """A second home (--to-home, --from-home): one of ours, and not `home` itself."""
    other = Home(resolve_path(option)).require()
    if other.path.resolve() == home.path.resolve():
        raise UsageError(f"{other.path} is the home itself; name another home, or a file")
    return other


# -- copying ---------------------------------------------------------------------------


def export(home: Home, *, to_file: StudyFile | None = None, to_home: Home | None = None,
           studies: tuple[str, ...] = (), allow_running: bool = False, wait: float = 0.0,
           say: Callable[[str], None] = print) -> list[Copied]:
    """Copy the home's studies (all, or those named) into a file or another home."""
    target = _FileSide(to_file) if to_file else _HomeSide(to_home, wait)
    return copy(_HomeSide(home, wait), target, studies, allow_running=allow_running, say=say)


def import_(home: Home, *, from_file: StudyFile | None = None, from_home: Home | None = None,
            studies: tuple[str, ...] = (), allow_running: bool = False, wait: float = 0.0,
            say: Callable[[str], None] = print) -> list[Copied]:
    """Copy the studies of a file or another home (all, or those named) into the home."""
    source = _FileSide(from_file) if from_file else _HomeSide(from_home, wait)
    return copy(source, _HomeSide(home, wait), studies, allow_running=allow_running, say=say)


def copy(source, target, names: tuple[str, ...], *, allow_running: bool,
         say: Callable[[str], None]) -> list[Copied]:
    """Every check first (the studies exist, none is running, none is in the target), then
    one copy_study per study, each whole or not at all, with a line said for each once it
    is in the target for good: at once, or for a new file once the file is placed."""
    source.check_source()
    target.check_target()
    with _quiet_optuna(), source.reading() as reader:
        chosen = _choose(reader, names, source.label)
        if not chosen:
            say(f"no studies in {source.label}: nothing copied")
            return []
        if not allow_running:
            _refuse_running(reader, chosen, source.label)
        done: list[Copied] = []
        with target.writing() as writer:
            _refuse_clashes(writer, chosen, target.label)
            for name in chosen:
                done.append(_copy_one(reader, writer, name, target.label))
                if not target.all_or_nothing:
                    say(_copied_line(done[-1], target.label))
    if target.all_or_nothing:
        for copied in done:
            say(_copied_line(copied, target.label))
    return done


def _copied_line(copied: Copied, label: str) -> str:
    trials = f"{copied.trials} trial" + ("" if copied.trials == 1 else "s")
    return f"copied {copied.study!r} ({trials}) to {label}"


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every study it creates; pgjob says its own line per study instead."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def _choose(storage, names: tuple[str, ...], label: str) -> list[str]:
    there = [s.study_name for s in storage.get_all_studies()]
    if not names:
        return there
    missing = [n for n in names if n not in there]
    if missing:
        has = ", ".join(repr(n) for n in there[:10]) + (" ..." if len(there) > 10 else "")
        raise UsageError(f"no study named {missing[0]!r} in {label}; it has "
                         f"{has or 'no studies'}. Name one of those with --study, or leave "
                         "--study out to copy them all")
    return list(dict.fromkeys(names))


def _refuse_running(storage, names: list[str], label: str) -> None:
    from optuna.trial import TrialState

    busy = []
    for name in names:
        study_id = storage.get_study_id_from_name(name)
        running = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            busy.append(f"{name!r} ({len(running)} RUNNING)")
    if busy:
        raise UsageError(
            f"trials are still running in {label}: {', '.join(busy)}; nothing was copied. "
            "Copy when their workers are done (or stopped), or pass --allow-running to copy "
            "those trials as RUNNING: in the copy no worker runs them and no server fails "
            "them")


def _refuse_clashes(storage, names: list[str], label: str) -> None:
    there = {s.study_name for s in storage.get_all_studies()}
    clashes = [n for n in names if n in there]
    if clashes:
        raise UsageError(
            f"{label} already has a study named {', '.join(repr(n) for n in clashes)}; "
            "nothing was copied (pgjob never merges two studies). Leave it out with "
            "--study NAME for the others, delete it there first (optuna delete-study), or "
            "copy into a new file")


def _copy_one(reader, writer, name: str, label: str) -> Copied:
    """One study, whole or not at all: a copy cut short is deleted from the target."""
    import optuna

    try:
        optuna.copy_study(from_study_name=name, from_storage=reader, to_storage=writer)
    except optuna.exceptions.DuplicatedStudyError:
        raise UsageError(f"{label} got a study named {name!r} from someone else while "
                         "copying; it was left alone, and nothing of it copied: see whose "
                         "it is, then copy again") from None
    except PgJobError as exc:  # the server stayed away, say: the message says what to do
        _delete_partial(writer, name, exc)
        raise
    except Exception as exc:  # a damaged source, most often
        _delete_partial(writer, name, exc)
        raise PgJobError(f"copying {name!r} failed: {first_line(exc)}; nothing of it was "
                         f"left in {label}. If the source is damaged, copy the other studies "
                         "with --study") from exc
    except BaseException as exc:  # interrupted
        _delete_partial(writer, name, exc)
        raise
    trials = len(writer.get_all_trials(writer.get_study_id_from_name(name), deepcopy=False))
    return Copied(name, trials)


def _delete_partial(storage, name: str, cause: BaseException) -> None:
    """Remove what a failed copy made (the name was checked free just before)."""
    try:
        storage.delete_study(storage.get_study_id_from_name(name))
    except KeyError:
        return  # it failed before the study was made
    except Exception as exc:
        raise PgJobError(f"copying {name!r} failed ({first_line(cause)}), and its partial "
                         f"copy could not be deleted ({first_line(exc)}); delete it by hand "
                         "(optuna delete-study) before copying again") from cause
