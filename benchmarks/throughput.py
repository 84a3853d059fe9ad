"""Trials per second and per-trial latency for 1, 2, 4 and 8 worker processes, with a cheap
objective, RandomSampler and TPE, on every storage a user might choose:

- pgjob: `pgjob.optuna_storage()` on a pgjob server;
- plain (same server): `RDBStorage(url)` on that same pgjob server, the 0.95x baseline;
- plain (default PostgreSQL): `RDBStorage(url)` on a server as initdb leaves it;
- SQLite: `RDBStorage("sqlite:///file")`, one file shared by the workers;
- journal: Optuna's `JournalStorage(JournalFileBackend(file))`;
- in-memory: each worker with a private study, the ceiling (nothing is shared).

pgjob and plain-on-the-same-server run in alternating rounds, so that drift on the machine
hits both alike; their ratio is the median of the per-round ratios.
"""
from __future__ import annotations

import itertools
import time

from common import (DefaultServer, PgJobInstance, Workers, median, percentiles, scratch,
                    server_cpu_s)

BACKENDS = ("pgjob", "plain_same", "plain_default", "sqlite", "journal", "inmemory")
LABELS = {"pgjob": "pgjob storage", "plain_same": "plain RDBStorage, same server",
          "plain_default": "plain RDBStorage, default PostgreSQL", "sqlite": "SQLite file",
          "journal": "JournalFileBackend", "inmemory": "in-memory (not shared)"}
RATIO_TARGET = 0.95
_names = itertools.count()


def one_run(backend: str, target: str, sampler: str, workers: int, trials: int,
            server_pid: int | None = None) -> dict:
    """One run; with `server_pid`, also the server's CPU time per trial (measured from
    before the release to after the workers' backends have exited)."""
    kind = {"plain_same": "plain", "plain_default": "plain"}.get(backend, backend)
    group = Workers([kind, target, f"{backend}-{sampler}-{next(_names)}", sampler,
                     str(trials)], workers)
    released = group.start()
    server_before = server_cpu_s(server_pid) if server_pid else 0.0
    results = group.results()
    wall = time.perf_counter() - released
    group.finish()
    time.sleep(0.3 if server_pid else 0)  # the backends exit and are reaped
    total = workers * trials
    server_ms = (server_cpu_s(server_pid) - server_before) * 1000 / total if server_pid else 0
    return {"trials_per_s": total / wall,
            "latencies": [lat for r in results for lat in r["latencies"]],
            "worker_cpu_ms": sum(r["cpu"] for r in results) * 1000 / total,
            "server_cpu_ms": server_ms}


def measure(quick: bool) -> dict:
    counts = (1, 2) if quick else (1, 2, 4, 8)
    trials = {"random": 5, "tpe": 5} if quick else {"random": 150, "tpe": 100}
    rounds = 1 if quick else 3
    base = scratch("throughput")
    rows = []
    with PgJobInstance(base) as pgjob_server, DefaultServer(base) as default_server:
        targets = {"pgjob": str(pgjob_server.home_path), "plain_same": pgjob_server.url(),
                   "plain_default": default_server.url(), "sqlite": str(base / "study.db"),
                   "journal": str(base / "journal.log"), "inmemory": "-"}
        pids = {"pgjob": pgjob_server.endpoint.pid, "plain_same": pgjob_server.endpoint.pid,
                "plain_default": default_server.postmaster_pid()}
        for sampler in ("random", "tpe"):
            for n in counts:
                runs = {b: [] for b in BACKENDS}
                for _ in range(rounds):  # the pair compared with a target alternates
                    for backend in ("plain_same", "pgjob"):
                        runs[backend].append(one_run(backend, targets[backend], sampler, n,
                                                     trials[sampler], pids.get(backend)))
                for backend in BACKENDS[2:]:
                    runs[backend].append(one_run(backend, targets[backend], sampler, n,
                                                 trials[sampler], pids.get(backend)))
                ratios = [p["trials_per_s"] / q["trials_per_s"]
                          for p, q in zip(runs["pgjob"], runs["plain_same"])]
                for backend in BACKENDS:
                    rate = median([r["trials_per_s"] for r in runs[backend]])
                    rows.append({"sampler": sampler, "workers": n, "backend": backend,
                                 "label": LABELS[backend], "trials_per_s": round(rate, 1),
                                 "worker_cpu_ms": round(median(
                                     [r["worker_cpu_ms"] for r in runs[backend]]), 2),
                                 "server_cpu_ms": round(median(
                                     [r["server_cpu_ms"] for r in runs[backend]]), 2),
                                 "latency_ms": percentiles(
                                     [x for r in runs[backend] for x in r["latencies"]])})
                rows.append({"sampler": sampler, "workers": n, "backend": "ratio",
                             "pgjob_vs_plain": round(median(ratios), 3)})
    return {"trials_per_worker": trials, "rounds": rounds, "rows": rows,
            "targets": _check(rows)}


def _check(rows: list[dict]) -> dict:
    """Each target, and whether this run met it."""
    rate = {(r["sampler"], r["workers"], r["backend"]): r.get("trials_per_s")
            for r in rows}
    ratios = [r for r in rows if r["backend"] == "ratio"]
    vs_plain = all(r["pgjob_vs_plain"] >= RATIO_TARGET for r in ratios)
    vs_sqlite = all(rate[(s, n, "pgjob")] > rate[(s, n, "sqlite")]
                    for (s, n, b) in rate if b == "pgjob" and n >= 2)
    return {"pgjob >= 0.95x plain RDBStorage on the same server, every N": vs_plain,
            "pgjob faster than SQLite from 2 workers": vs_sqlite}
