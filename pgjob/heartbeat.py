"""One heartbeat thread per worker process, for all the trials it runs.

Optuna's own heartbeat starts a thread and writes a row at the start of every trial: on a
fast objective that is a thread and a commit more per trial (10-15 % of the throughput of
two workers here). This thread writes the heartbeats of every trial the process runs in a
single statement: within about a second of a trial starting, then every interval. It
follows trials through the storage (created RUNNING, claimed from WAITING, finished), so
ask/tell workers are covered too. The server fails the trials whose heartbeat stops.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("pgjob.heartbeat")

GATHER = 1.0  # seconds to wait after a new trial, so that one write covers several

UPSERT = """
set local synchronous_commit = off;
insert into trial_heartbeats (trial_id, heartbeat)
select unnest('{{{ids}}}'::int[]), now()
on conflict (trial_id) do update set heartbeat = excluded.heartbeat
"""
# A heartbeat lost in a crash is harmless (the next server refreshes all heartbeats), so
# it need not wait for the WAL flush.


class Heartbeats:
    def __init__(self, engine, interval: float) -> None:
        self.engine = engine
        self.interval = interval
        self.running: set[int] = set()
        self.lock = threading.Lock()
        self.new_trial = threading.Event()
        self.thread: threading.Thread | None = None

    def started(self, trial_id: int) -> None:
        with self.lock:
            self.running.add(trial_id)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._beat, name="pgjob-heartbeat",
                                               daemon=True)
                self.thread.start()
        self.new_trial.set()

    def finished(self, trial_id: int) -> None:
        with self.lock:
            self.running.discard(trial_id)

    def _beat(self) -> None:
        while True:
            if self.new_trial.wait(self.interval):
                self.new_trial.clear()
                time.sleep(GATHER)
            with self.lock:
                ids = sorted(self.running)
            if not ids:
                continue
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(UPSERT.format(ids=",".join(str(int(i)) for i in ids)))
            except Exception as exc:  # the next beat tries again, through a new connection
                log.debug("heartbeat not written: %s", exc)
