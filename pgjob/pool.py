"""The connection pool of a worker process: one connection, and a second one only while two
are needed at once.

SQLAlchemy's QueuePool(pool_size=1, max_overflow=1) has the right limits, but it closes the
second connection the moment it is returned. With `n_jobs` threads, or the heartbeat
thread, two are often needed a moment later again, and each new connection costs a TLS
and SCRAM handshake: 175 connections were opened for 200 trials with n_jobs=4. Here the
second connection is kept as a spare and reused, and closed only once it has been idle for
SPARE_IDLE seconds, so a process holds two at peak and one when idle.
"""
from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.pool import QueuePool
from sqlalchemy.util.queue import Empty

SPARE_IDLE = 5.0

# SQLAlchemy names a pool's logger after the pool's class, which puts SparePool's INFO
# chatter ("Pool disposed", on every dispose) under pgjob's own logger and so on the
# stderr of every pgjob command that opens a storage; SQLAlchemy keeps its own at WARNING.
logging.getLogger(f"{__name__}.SparePool").setLevel(logging.WARNING)


class SparePool(QueuePool):
    def __init__(self, creator, pool_size=1, max_overflow=1, **kw) -> None:
        super().__init__(creator, pool_size=pool_size, max_overflow=max_overflow, **kw)
        self._spare = None
        self._spare_since = 0.0
        self._spare_lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._disposed = False

    def _do_return_conn(self, record) -> None:
        if self._pool.qsize() < self._pool.maxsize:
            super()._do_return_conn(record)
            return
        with self._spare_lock:
            if self._spare is None:
                self._spare, self._spare_since = record, time.monotonic()
                self._start_keeper()
                return
        super()._do_return_conn(record)  # the pool is full: closes it

    def _do_get(self):
        try:
            return self._pool.get(False)  # the pooled connection first; a spare may idle out
        except Empty:
            pass
        with self._spare_lock:
            spare, self._spare = self._spare, None
        return spare if spare is not None else super()._do_get()

    def trim(self, idle_for: float = SPARE_IDLE) -> None:
        """Close the spare connection if it has not been used for `idle_for` seconds."""
        with self._spare_lock:
            spare = self._spare
            if spare is None or time.monotonic() - self._spare_since < idle_for:
                return
            self._spare = None
        self._close_spare(spare)

    def _close_spare(self, spare) -> None:
        try:
            spare.close()
        finally:
            self._dec_overflow()

    def _start_keeper(self) -> None:
        if self._keeper is None or not self._keeper.is_alive():
            self._keeper = threading.Thread(target=self._keep, name="pgjob-pool-trim",
                                            daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        while not self._disposed and self._spare is not None:
            time.sleep(SPARE_IDLE / 2)
            self.trim()

    def dispose(self) -> None:
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()
        self._disposed = True
        super().dispose()

    def recreate(self) -> "SparePool":
        self.logger.info("Pool recreating")
        return self.__class__(
            self._creator, pool_size=self._pool.maxsize, max_overflow=self._max_overflow,
            pre_ping=self._pre_ping, use_lifo=self._pool.use_lifo, timeout=self._timeout,
            recycle=self._recycle, echo=self.echo, logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return, _dispatch=self.dispatch,
            dialect=self._dialect)
