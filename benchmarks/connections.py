"""Server backends per worker process, at peak (while trials run) and idle (trials done,
storage still open): pgjob's storage against a plain RDBStorage with SQLAlchemy's default
pool (up to 5 + 10 overflow per engine), with one thread and with `n_jobs` threads.

Each worker process sets its own application_name (PGAPPNAME), and pg_stat_activity is
sampled every few milliseconds; idle is counted once pgjob's spare connection has had
time to idle out (pool.SPARE_IDLE). Target for pgjob: at most 2 at peak and 1 idle per process.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

from common import PgJobInstance, Workers, scratch
from pgjob.pool import SPARE_IDLE

PEAK_TARGET, IDLE_TARGET = 2, 1
QUERY = ("select application_name from pg_stat_activity "
         "where application_name like 'bench-%'")


def _sample(conn) -> Counter:
    return Counter(row[0] for row in conn.execute(QUERY).fetchall())


def one_run(instance: PgJobInstance, backend: str, processes: int, threads: int,
            trials: int) -> dict:
    tag = f"{backend}-{threads}"
    target = str(instance.home_path) if backend == "pgjob" else instance.url()
    group = Workers([backend, target, f"conn-{tag}", "random", str(trials), str(threads)],
                    processes, env=[{"PGAPPNAME": f"bench-{tag}-{i}"} for i in range(processes)])
    peak: Counter = Counter()
    done = threading.Event()
    with instance.endpoint.connect() as conn:
        def watch():
            while not done.is_set():
                for name, count in _sample(conn).items():
                    peak[name] = max(peak[name], count)
                time.sleep(0.005)
        group.start("hold")
        watcher = threading.Thread(target=watch)
        watcher.start()
        group.results()
        done.set()
        watcher.join()
        # what stays open once the trials are done and pgjob's spare has idled out
        time.sleep(SPARE_IDLE * 1.5 + 0.5)
        idle = Counter()
        for _ in range(5):
            for name, count in _sample(conn).items():
                idle[name] = max(idle[name], count)
            time.sleep(0.1)
    group.finish()
    names = [f"bench-{tag}-{i}" for i in range(processes)]
    return {"backend": backend, "threads": threads, "processes": processes,
            "peak_max": max(peak[n] for n in names),
            "peak_mean": round(sum(peak[n] for n in names) / processes, 2),
            "idle_max": max(idle[n] for n in names),
            "idle_mean": round(sum(idle[n] for n in names) / processes, 2)}


def measure(quick: bool) -> dict:
    processes, trials = (2, 10) if quick else (4, 150)
    rows = []
    with PgJobInstance(scratch("connections")) as instance:
        for backend in ("pgjob", "plain"):
            for threads in (1, 4):
                rows.append(one_run(instance, backend, processes, threads, trials))
    ours = [r for r in rows if r["backend"] == "pgjob"]
    return {"rows": rows, "targets": {
        "pgjob: at most 2 backends per process at peak": all(
            r["peak_max"] <= PEAK_TARGET for r in ours),
        "pgjob: at most 1 backend per process idle": all(
            r["idle_max"] <= IDLE_TARGET for r in ours)}}
