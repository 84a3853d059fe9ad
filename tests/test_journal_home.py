"""A journal home (storage = "journal") served for real.

One served home for the module, with 1 s heartbeats and a 3 s grace period; each test uses
studies of its own names.
"""
from __future__ import annotations

import collections
import pickle
import shutil

import optuna
import pytest

import pgjob
from conftest import FAST, Served, set_settings
from pgjob import journal
from pgjob.home import open_home
from pgjob.journal import PgJournalBackend

pytestmark = pytest.mark.pg

optuna.logging.set_verbosity(optuna.logging.WARNING)


class JournalHome:
    """The module's served journal home, and a storage of the test's own to look with."""

    def __init__(self, path, log) -> None:
        self.path, self.log = path, log
        self.home = open_home(path)
        self.served: Served | None = None
        self._storage = None

    def start(self) -> None:
        self.served = Served(self.path, self.log)
        Served.started.remove(self.served)  # it outlives each test: stopped by the fixture
        self.served.endpoint()

    def stop(self) -> None:
        if self.served is not None and self.served.process.poll() is None:
            assert self.served.stop() == 0, self.log.read_text()

    @property
    def storage(self):
        if self._storage is None:
            self._storage = pgjob.optuna_storage(self.path, wait=60)
        return self._storage

    def trials(self, name: str) -> list[optuna.trial.FrozenTrial]:
        try:
            return optuna.load_study(study_name=name, storage=self.storage).trials
        except KeyError:  # no worker has made it yet
            return []

    def states(self, name: str) -> dict[str, int]:
        return dict(collections.Counter(t.state.name for t in self.trials(name)))

    def beats(self) -> set[int]:
        """The trials with a pgjob heartbeat row."""
        with self.served.endpoint().connect() as conn:
            return {i for (i,) in conn.execute("select trial_id from pgjob_heartbeats")}


@pytest.fixture(scope="module")
def journal_home(template_home, tmp_path_factory):
    base = tmp_path_factory.mktemp("journal")
    path = base / "home"
    shutil.copytree(template_home, path, symlinks=True)
    set_settings(path, storage="journal", **FAST)
    home = JournalHome(path, base / "serve.log")
    home.start()
    try:
        yield home
    finally:
        home.stop()


def test_an_append_after_a_snapshot_gets_only_the_logs_after_it(journal_home, monkeypatch):
    """A replay restored from a snapshot has read up to it: the storage's next append must
    fetch only what follows, not the whole journal again."""
    monkeypatch.setattr(journal, "SNAPSHOT_MIN_LOGS", 0)
    writer = optuna.storages.JournalStorage(PgJournalBackend(journal_home.home, wait=10))
    study_id = writer.create_new_study([optuna.study.StudyDirection.MINIMIZE], "snapped")
    writer._backend._snapshot_upto = 0  # however recent the last snapshot, save this one
    writer._backend.save_snapshot(pickle.dumps(writer._replay_result))
    writer._backend.close()

    backend = PgJournalBackend(journal_home.home, wait=10)
    joined = optuna.storages.JournalStorage(backend)
    assert backend._snapshot_upto > 0  # it did start from the snapshot
    replies = []
    append = backend.append_logs

    def counted(logs):
        append(logs)
        replies.append(len(backend._fetched[1]))
    backend.append_logs = counted
    joined.set_study_user_attr(study_id, "seen", True)
    assert replies == [1]
    assert joined.get_study_user_attrs(study_id) == {"seen": True}
    backend.close()
