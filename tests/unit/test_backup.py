"""backup.py without a server: rotation, connection parameters, where a dump is written.

A stand-in pg_dump (a small shell script) plays the real one's part of writing to its
standard output and failing with a message on standard error.
"""
import os
import stat
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from pgjob import backup
from pgjob.errors import PgJobError
from pgjob.home import Home


def make_dumps(folder: Path, *stamps: str) -> list[Path]:
    folder.mkdir(exist_ok=True)
    made = [folder / f"optuna-{s}.dump" for s in stamps]
    for path in made:
        path.write_bytes(b"PGDMP")
    return made


def test_rotation_keeps_the_newest(tmp_path):
    dumps = make_dumps(tmp_path / "b", "20240101-000000-000", "20240102-000000-000",
                       "20240103-000000-000", "20240104-000000-000")
    backup.rotate(tmp_path / "b", 2, newest=dumps[-1])
    assert sorted((tmp_path / "b").iterdir()) == dumps[-2:]


def test_rotation_with_keep_0_never_removes_the_dump_just_written(tmp_path):
    dumps = make_dumps(tmp_path / "b", "20240101-000000-000", "20240102-000000-000")
    backup.rotate(tmp_path / "b", 0, newest=dumps[-1])
    assert sorted((tmp_path / "b").iterdir()) == [dumps[-1]]


def test_rotation_keeps_the_dump_just_written_even_when_its_name_sorts_first(tmp_path):
    # a clock set back, or another backup that finished at the same time with a later name
    dumps = make_dumps(tmp_path / "b", "20240101-000000-000", "20240102-000000-000",
                       "20240103-000000-000")
    backup.rotate(tmp_path / "b", 1, newest=dumps[0])
    assert sorted((tmp_path / "b").iterdir()) == [dumps[0], dumps[-1]]


def test_rotation_leaves_what_is_not_a_dump_file(tmp_path):
    folder = tmp_path / "b"
    dumps = make_dumps(folder, "20240101-000000-000", "20240102-000000-000")
    (folder / "notes.txt").write_text("mine")
    (folder / "a-link.dump").symlink_to(tmp_path / "elsewhere.dump")
    (folder / "a-dir.dump").mkdir()
    backup.rotate(folder, 1, newest=dumps[-1])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["notes.txt", "a-link.dump", "a-dir.dump", dumps[-1].name])


@pytest.fixture
def home(tmp_path) -> Home:
    path = tmp_path / "it's a home with 100% spaces"
    (path / "secrets").mkdir(parents=True)
    return Home(path)


def test_connection_parameters_survive_quotes_spaces_and_percent_signs(home):
    parsed = conninfo_to_dict(backup.conninfo(home, host="/tmp/a 'b' c", port=5432))
    assert parsed["passfile"] == str(home.app_passfile)
    assert parsed["sslrootcert"] == str(home.secrets / "ca.crt")
    assert parsed["host"] == "/tmp/a 'b' c"


@pytest.fixture
def bindir(tmp_path) -> Path:
    """A pg_dump that writes what PG_DUMP_WRITES says to stdout, or fails if told to."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "pg_dump"
    script.write_text('#!/bin/sh\n'
                      'for a in "$@"; do case "$a" in --file*) echo "got $a" >&2; exit 9;; '
                      'esac; done\n'
                      '[ -n "$PG_DUMP_FAILS" ] && { echo "pg_dump: error: $PG_DUMP_FAILS" >&2; '
                      'exit 1; }\n'
                      'printf "PGDMP and the studies"\n')
    script.chmod(0o755)
    return folder


def dump(home, bindir, **kw) -> Path:
    return backup.dump(home, bindir, host="/nowhere", port=5432, **kw)


def test_a_dump_is_private_whatever_the_umask_and_ends_in_its_final_name(home, bindir,
                                                                        tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o1777)
    before = os.umask(0)
    try:
        made = dump(home, bindir, out_dir=out)
    finally:
        os.umask(before)
    assert made.read_bytes() == b"PGDMP and the studies"
    assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert list(out.iterdir()) == [made]  # no temporary file left


def test_a_missing_out_folder_is_created_private(home, bindir, tmp_path):
    made = dump(home, bindir, out_dir=tmp_path / "new")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    assert made.parent == tmp_path / "new"


def test_an_out_folder_that_cannot_be_made_or_written_is_a_clear_error(home, bindir,
                                                                       tmp_path):
    with pytest.raises(PgJobError, match="cannot create the backup folder .*missing"):
        dump(home, bindir, out_dir=tmp_path / "missing" / "deeper")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as root, which may write into a 0500 folder, so an unwritable "
                    "--out cannot be made here; ./dev test runs this as an unprivileged user")
    with pytest.raises(PgJobError, match="could not write a backup into .*locked"):
        dump(home, bindir, out_dir=locked)


def test_a_failed_pg_dump_leaves_no_file_behind(home, bindir, tmp_path, monkeypatch):
    monkeypatch.setenv("PG_DUMP_FAILS", "connection refused")
    out = tmp_path / "out"
    with pytest.raises(PgJobError, match="pg_dump failed") as failed:
        dump(home, bindir, out_dir=out)
    assert "connection refused" in str(failed.value)  # its stderr, for the user
    assert list(out.iterdir()) == []


def test_backups_in_the_home_are_rotated_but_never_the_new_one(home, bindir):
    old = make_dumps(home.backups, "20240101-000000-000")
    made = dump(home, bindir, keep=0)
    assert sorted(home.backups.iterdir()) == [made] and made not in old
