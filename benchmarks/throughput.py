"""Trials per second and per-trial latency for 1, 2, 4 and 8 worker processes, with a cheap
objective, RandomSampler and TPE, on every storage a user might choose:

- pgjob: `pgjob.optuna_storage()` on a pgjob server (an rdb home, the default);
- pgjob journal: `pgjob.optuna_storage()` on a journal home (storage = "journal"): Optuna's
  JournalStorage with its logs in that home's server, a second pgjob server alike in all
  but the setting;
- plain (same server): `RDBStorage(url)` on the rdb home's server, the baseline of both
  pgjob storages' targets;
- plain (default PostgreSQL): `RDBStorage(url)` on a server as initdb leaves it;
- SQLite: `RDBStorage("sqlite:///file")`, one file shared by the workers;
- journal: Optuna's `JournalStorage(JournalFileBackend(file))` on local disk;
- in-memory: each worker with a private study, the ceiling (nothing is shared).

pgjob, pgjob journal, JournalFileBackend and plain-on-the-same-server run in alternating
rounds, so that drift on the machine hits them alike; a ratio is the median of the
per-round ratios. Each run is a new study; the two journals are emptied before each of
their runs (see empty_journal).
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import prefill
from common import (DefaultServer, PgJobInstance, Workers, median, percentiles, scratch,
                    server_cpu_s)

BACKENDS = ("pgjob", "pgjob_journal", "plain_same", "journal", "plain_default", "sqlite",
            "inmemory")
ROUNDS = BACKENDS[:4]  # run in alternating rounds: the targets compare these
LABELS = {"pgjob": "pgjob storage", "pgjob_journal": "pgjob journal",
          "plain_same": "plain RDBStorage, same server",
          "plain_default": "plain RDBStorage, default PostgreSQL", "sqlite": "SQLite file",
          "journal": "JournalFileBackend", "inmemory": "in-memory (not shared)"}
RATIO_TARGET = 0.95
JOURNAL_RATIO_TARGET = 3.0  # pgjob journal against plain RDBStorage on the same server
_names = itertools.count()


def one_run(backend: str, target: str, sampler: str, workers: int, trials: int,
            server_pid: int | None = None, study: str | None = None) -> dict:
    """One run, in a new study unless `study` names one; with `server_pid`, also the
    server's CPU time per trial (measured from before the release to after the workers'
    backends have exited)."""
    kind = {"plain_same": "plain", "plain_default": "plain",
            "pgjob_journal": "pgjob"}.get(backend, backend)
    study = study or f"{backend}-{sampler}-{next(_names)}"
    group = Workers([kind, target, study, sampler, str(trials)], workers)
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
    with PgJobInstance(base) as pgjob_server, DefaultServer(base) as default_server, \
            PgJobInstance(base, storage="journal") as journal_server:
        targets = {"pgjob": str(pgjob_server.home_path), "plain_same": pgjob_server.url(),
                   "pgjob_journal": str(journal_server.home_path),
                   "plain_default": default_server.url(), "sqlite": str(base / "study.db"),
                   "journal": str(base / "journal.log"), "inmemory": "-"}
        pids = {"pgjob": pgjob_server.endpoint.pid, "plain_same": pgjob_server.endpoint.pid,
                "pgjob_journal": journal_server.endpoint.pid,
                "plain_default": default_server.postmaster_pid()}
        for sampler in ("random", "tpe"):
            for n in counts:
                runs = {b: [] for b in BACKENDS}
                for _ in range(rounds):  # those compared with a target alternate
                    for backend in ROUNDS:
                        empty_journal(backend, targets[backend], journal_server)
                        runs[backend].append(one_run(backend, targets[backend], sampler, n,
                                                     trials[sampler], pids.get(backend)))
                for backend in BACKENDS[len(ROUNDS):]:
                    runs[backend].append(one_run(backend, targets[backend], sampler, n,
                                                 trials[sampler], pids.get(backend)))
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
                             "pgjob_vs_plain": _ratio(runs, "pgjob", "plain_same"),
                             "journal_vs_plain": _ratio(runs, "pgjob_journal", "plain_same"),
                             "journal_vs_file": _ratio(runs, "pgjob_journal", "journal")})
    return {"trials_per_worker": trials, "rounds": rounds, "rows": rows,
            "targets": _check(rows)}


def empty_journal(backend: str, target: str, journal_server: PgJobInstance) -> None:
    """Each run of a journal storage starts on an empty journal, as a study alone in its
    home or file would: every worker keeps the whole journal in memory, and Optuna pickles
    all of it every 100th trial to offer a snapshot, so earlier runs' studies would weigh
    on later runs (journal_size.py measures what a large journal costs)."""
    if backend == "journal":
        Path(target).unlink(missing_ok=True)
    elif backend == "pgjob_journal":
        with journal_server.endpoint.connect() as conn:
            prefill.clear_journal(conn)


def _ratio(runs: dict, ours: str, theirs: str) -> float:
    """The median over the rounds of `ours`' rate over `theirs`' in the same round."""
    return round(median([p["trials_per_s"] / q["trials_per_s"]
                         for p, q in zip(runs[ours], runs[theirs])]), 3)


def _check(rows: list[dict]) -> dict:
    """Each target, and whether this run met it."""
    rate = {(r["sampler"], r["workers"], r["backend"]): r.get("trials_per_s")
            for r in rows}
    ratios = [r for r in rows if r["backend"] == "ratio"]
    vs_plain = all(r["pgjob_vs_plain"] >= RATIO_TARGET for r in ratios)
    vs_sqlite = all(rate[(s, n, "pgjob")] > rate[(s, n, "sqlite")]
                    for (s, n, b) in rate if b == "pgjob" and n >= 2)
    journal_vs_plain = all(r["journal_vs_plain"] >= JOURNAL_RATIO_TARGET for r in ratios)
    journal_vs_file = all(r["journal_vs_file"] >= 1.0 for r in ratios if r["workers"] >= 4)
    return {"pgjob >= 0.95x plain RDBStorage on the same server, every N": vs_plain,
            "pgjob faster than SQLite from 2 workers": vs_sqlite,
            "pgjob journal >= 3x plain RDBStorage on the same server, every N, both "
            "samplers": journal_vs_plain,
            "pgjob journal >= JournalFileBackend at 4 and 8 workers": journal_vs_file}
