"""What a journal home's storage costs per trial as its study grows: TPE, one worker, after
prefilling 0, 1k, 10k and 50k finished trials.

The same worker (worker.py) runs the same number of trials with TPESampler on the journal
home's study and on an in-memory study that holds the same trials (prefill.py): the
in-memory run is the sampler's own cost, and the difference is what the storage adds
(storage overhead = pgjob journal minus in-memory). The journal is emptied between sizes,
so each study is alone in it, as in a home of its own.

Before the timed trials of a prefilled study, one worker (joiner.py grow) saves a snapshot,
so the timed worker starts as in a study that has been running: it loads that snapshot,
and saves none of its own (pgjob's throttle). Optuna still pickles its whole state every
100th trial to offer one, and that is counted: the timed run is 100 trials, so it holds
exactly one such offer. Two rounds at each size (one at 50k, where TPE alone takes about
half a second a trial), each on a study filled anew. Also measured: the server's CPU per
trial.
Target: storage overhead at most 20 ms per trial at 10k trials.
"""
from __future__ import annotations

import prefill
from common import PgJobInstance, median, percentiles, run_json, scratch
from pgjob.journal import SNAPSHOT_MIN_LOGS
from throughput import one_run

OVERHEAD_TARGET_MS = 20.0
TARGET_SIZE = 10_000


def grow(home: str, study: str) -> dict:
    """One worker adding trials until it has saved a snapshot of the journal."""
    return run_json("joiner.py", "grow", home, study)


def one_size(instance: PgJobInstance, size: int, trials: int, rounds: int) -> dict:
    """`rounds` runs of `trials` TPE trials after `size`, on the journal home and in memory."""
    home, study = str(instance.home_path), f"size-{size}"
    journal, memory = [], []
    for _ in range(rounds):  # each round on a study filled anew: the same trials as memory's
        with instance.endpoint.connect() as conn:
            prefill.fill_journal(conn, study, size)
        if size * 4 >= SNAPSHOT_MIN_LOGS:
            grow(home, study)
        journal.append(one_run("pgjob_journal", home, "tpe", 1, trials, instance.endpoint.pid,
                               study=study))
        memory.append(one_run("inmemory", str(size), "tpe", 1, trials))

    def ms(runs: list[dict]) -> float:
        return round(median([1000 / r["trials_per_s"] for r in runs]), 2)
    return {"prefill": size, "rounds": rounds, "journal_ms": ms(journal), "memory_ms": ms(memory),
            "overhead_ms": round(ms(journal) - ms(memory), 2),
            "journal_latency_ms": percentiles([x for r in journal for x in r["latencies"]]),
            "memory_latency_ms": percentiles([x for r in memory for x in r["latencies"]]),
            "journal_worker_cpu_ms": round(median([r["worker_cpu_ms"] for r in journal]), 2),
            "memory_worker_cpu_ms": round(median([r["worker_cpu_ms"] for r in memory]), 2),
            "server_cpu_ms": round(median([r["server_cpu_ms"] for r in journal]), 2)}


def measure(quick: bool) -> dict:
    # at 50k trials TPE alone takes about half a second a trial: one round there
    sizes, trials, rounds = ({0: 1, 600: 1}, 10, 1) if quick else (
        {0: 2, 1_000: 2, 10_000: 2, 50_000: 1}, 100, 2)
    with PgJobInstance(scratch("journal-size"), storage="journal") as instance:
        rows = [one_size(instance, size, trials, rounds) for size, rounds in sizes.items()]
    at = next((r for r in rows if r["prefill"] == TARGET_SIZE), rows[-1])
    return {"trials": trials, "rows": rows, "targets": {
        f"storage overhead per trial <= {OVERHEAD_TARGET_MS:.0f} ms at {at['prefill']:,} "
        "trials (TPE)": at["overhead_ms"] <= OVERHEAD_TARGET_MS}}
