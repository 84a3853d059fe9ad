"""PgJobJournalStorage: Optuna's JournalStorage on a journal home's server.

Optuna's JournalStorage, whole, on pgjob's journal backend (journal.py), which follows
the server across restarts and moves and never writes an append twice. Added:
- pgjob's liveness for the trials this process runs (heartbeat.py), judged by the server
  (trials.py), which fails a dead worker's trial by appending its log;
- pickling (the backend reconnects where the server is then) and fork safety (a child
  drops the parent's connection without closing it, and gets a worker id of its own, so
  that parent and child never take each other's trials for their own).

Importing this module imports Optuna; `pgjob.optuna_storage` does it only on journal homes.
"""
from __future__ import annotations

import os
import uuid
import weakref

from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import TrialState

from . import heartbeat
from .home import Home
from .journal import PgJournalBackend

_LIVE: "weakref.WeakSet[PgJobJournalStorage]" = weakref.WeakSet()


class _NoSnapshots(BaseJournalBackend):
    """The same backend, seen without its snapshots: what Optuna is given to create a
    trial while no snapshot is due, so that it does not pickle the whole study for one
    that would not be saved."""

    def __init__(self, backend: PgJournalBackend) -> None:
        self.backend = backend

    def read_logs(self, log_number_from):
        return self.backend.read_logs(log_number_from)

    def append_logs(self, logs):
        self.backend.append_logs(logs)

    def __getattr__(self, name):  # run(), wait_for_logs(), ... as the backend has them
        if name == "backend" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.backend, name)


def _close(backend: PgJournalBackend, beats: heartbeat.Heartbeats) -> None:
    beats.new_trial.set()  # wake the thread, which finds its storage gone and ends
    backend.close()


class PgJobJournalStorage(JournalStorage):
    """JournalStorage whose logs are in a pgjob server, which it follows across moves."""

    def __init__(self, home: Home, *, wait: float = 600.0) -> None:
        settings = home.settings()
        self.pgjob_home = home
        self.pgjob_liveness = (settings.heartbeat_interval, settings.grace_period, True)
        pause = min(5.0, max(0.5, settings.grace_period / 4))  # as for rdb homes
        super().__init__(PgJournalBackend(home, wait=wait, pause=pause))
        self._follow()

    def _follow(self) -> None:
        self.pgjob_heartbeats = heartbeat.Heartbeats(self, *self.pgjob_liveness)
        weakref.finalize(self, _close, self._backend, self.pgjob_heartbeats)
        _LIVE.add(self)

    @property
    def pgjob_backend(self) -> PgJournalBackend:
        backend = self._backend
        return backend.backend if isinstance(backend, _NoSnapshots) else backend

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("pgjob_heartbeats", None)
        state["_backend"] = self.pgjob_backend  # never the view a trial creation uses
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Optuna's unpickled storage starts from an empty state and reads the journal on
        # its first call; the snapshot makes that fast.
        with self._thread_lock:
            snapshot = self._backend.load_snapshot()
            if snapshot is not None:
                self.restore_replay_result(snapshot)
        self._follow()

    def _forked(self) -> None:
        self.pgjob_backend.forked()
        self._worker_id_prefix = str(uuid.uuid4()) + "-"
        self._replay_result._worker_id_prefix = self._worker_id_prefix
        self.pgjob_heartbeats = heartbeat.Heartbeats(self, *self.pgjob_liveness)

    def wait_for_change(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for any worker to write to this home's studies
        (a new trial, a result, ...); whether one did. For a script that waits on others'
        results (an ask-and-tell driver, a monitor): it sleeps on a NOTIFY from the
        server instead of reading the studies in a loop."""
        with self._thread_lock:
            self._sync_with_backend()
            seen = self._replay_result.log_number_read
        return self.pgjob_backend.wait_for_logs(seen, timeout)

    # -- trials: snapshots only when due, and pgjob's heartbeat -------------------------

    def create_new_trial(self, study_id, template_trial=None):
        backend = self.pgjob_backend
        if backend.snapshot_due():
            trial_id = super().create_new_trial(study_id, template_trial)
        else:
            self._backend = _NoSnapshots(backend)
            try:
                trial_id = super().create_new_trial(study_id, template_trial)
            finally:
                self._backend = backend
        # a copy (add_trial, copy_study, a retry) is nobody's trial to run, so not ours
        if template_trial is None:
            self.pgjob_heartbeats.started(trial_id)
        return trial_id

    def set_trial_state_values(self, trial_id, state, values=None):
        try:
            updated = super().set_trial_state_values(trial_id, state, values)
        finally:
            if state.is_finished():  # done, or finished by someone else: no more beats
                self.pgjob_heartbeats.finished(trial_id)
        if state == TrialState.RUNNING and updated:
            self.pgjob_heartbeats.started(trial_id)
        return updated

    def pgjob_beat(self, params: dict) -> set[int]:
        """One heartbeat for the trials `params["ids"]`; those still RUNNING as the
        journal says (a trial the server failed meanwhile drops out)."""
        # One statement on its own: no transaction stays open across round trips, so a
        # worker stopped right here (SIGSTOP) holds no row the server's sweep must touch.
        self.pgjob_backend.run("a heartbeat",
                               lambda conn: conn.execute(heartbeat.BEAT_ALL, params))
        with self._thread_lock:
            self._sync_with_backend()
            trials = self._replay_result._trials
            return {i for i in params["ids"]
                    if i in trials and trials[i].state == TrialState.RUNNING}


def _after_fork_in_child() -> None:
    for storage in list(_LIVE):
        storage._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
