"""serve's node-local private directories: a later serve removes only what a dead serve
of the same account left, proven by the mark inside, and follows no link doing it."""
import os

import pytest

from pgjob import schedulers
from pgjob.control import own_record
from pgjob.instance import PRIVATE_MARK, mark_private_dir, remove_stale_private_dirs

UID = os.geteuid()


def _private(base, name, record=None, mode=0o700):
    path = base / f"pgjob-{UID}-{name}"
    path.mkdir(mode=mode)
    os.chmod(path, mode)
    (path / "userlist.txt").write_text("left behind\n")
    if record is not None:
        mark_private_dir(path, record)
    return path


def test_only_dirs_proven_ours_and_dead_are_removed(tmp_path):
    base = tmp_path / "tmp"
    base.mkdir()
    node = schedulers.node_name()
    dead = {"node": node, "pid": os.getpid(), "create_time": 1.0}  # that process is gone
    gone = _private(base, "gone", dead)
    live = _private(base, "live", own_record())
    unmarked = _private(base, "unmarked")
    garbled = _private(base, "garbled")
    (garbled / PRIVATE_MARK).write_text('{"node": ' + "[" * 100_000)
    elsewhere = _private(base, "elsewhere", {**dead, "node": f"{node}-other"})
    open_dir = _private(base, "open", dead, mode=0o755)
    target = _private(tmp_path, "target", dead)  # reached only through a link
    (base / f"pgjob-{UID}-link").symlink_to(target)
    assert remove_stale_private_dirs(UID, (str(base),)) == [gone]
    assert not gone.exists()
    for kept in (live, unmarked, garbled, elsewhere, open_dir, target):
        assert (kept / "userlist.txt").is_file(), kept
    assert (base / f"pgjob-{UID}-link").is_symlink()


def test_the_mark_is_never_written_through_a_link(tmp_path):
    private = _private(tmp_path, "mine")
    elsewhere = tmp_path / "elsewhere"
    (private / PRIVATE_MARK).symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        mark_private_dir(private, own_record())
    assert not elsewhere.exists()
