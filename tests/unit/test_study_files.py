"""transfer.py without a server: which kind of file a name or a file's content means."""
import sqlite3

import pytest

from pgjob.errors import UsageError
from pgjob.transfer import study_file


@pytest.mark.parametrize("name, kind", [("a.db", "sqlite"), ("a.SQLITE3", "sqlite"),
                                        ("a.log", "journal"), ("a.jsonl", "journal")])
def test_a_new_files_kind_comes_from_its_name(tmp_path, name, kind):
    found = study_file(str(tmp_path / name))
    assert (found.format, found.exists, found.path) == (kind, False, tmp_path / name)


def test_format_overrides_the_name_of_a_new_file_and_a_url_is_sqlite(tmp_path):
    assert study_file(str(tmp_path / "a.bin"), "journal").format == "journal"
    found = study_file(f"sqlite:///{tmp_path}/it's 100%25.out")
    assert (found.format, found.path) == ("sqlite", tmp_path / "it's 100%.out")
    with pytest.raises(UsageError, match="--format journal was given"):
        study_file(f"sqlite:///{tmp_path}/a.db", "journal")
    with pytest.raises(UsageError, match="add --format sqlite or --format journal"):
        study_file(str(tmp_path / "a.out"))
    with pytest.raises(UsageError, match="optuna.copy_study"):
        study_file("mysql://db.example/optuna")


def test_an_existing_files_kind_comes_from_its_content(tmp_path):
    journal_named = tmp_path / "really-sqlite.log"
    sqlite3.connect(journal_named).execute("create table t (x)").connection.commit()
    assert study_file(str(journal_named)).format == "sqlite"
    with pytest.raises(UsageError, match="is a SQLite file, not an Optuna journal file"):
        study_file(str(journal_named), "journal")
    text = tmp_path / "results.db"
    text.write_text('{"op_code": 0, "worker_id": "w"}\n')
    assert study_file(str(text)).format == "journal"
    with pytest.raises(UsageError, match="no file at"):
        study_file(str(tmp_path / "gone.db"), new=False)
