"""What pgjob's computed server settings change on this workload, against initdb's defaults.

The same server binary and data layout, restarted with each set of settings; the workload
is the throughput benchmark's (4 worker processes, RandomSampler, plain RDBStorage, so the
storage is the same and only the server differs; loopback, no TLS).

- defaults: postgresql.conf as initdb writes it (shared_buffers 128MB, synchronous_commit on);
- pgjob: what `pgjob serve` computes for this node (shared_buffers a quarter of the job's
  memory, effective_cache_size half); pgjob keeps synchronous_commit on;
- pgjob + synchronous_commit=off: what the last ~0.6 s of commits would buy, and cost
  (see docs/performance.md: a server crash may lose them);
- pgjob + WAL: wal_compression on, larger max_wal_size, fewer checkpoints.
"""
from __future__ import annotations

from common import DefaultServer, median, percentiles, scratch
from pgjob import conf, schedulers
from throughput import one_run

WAL = {"wal_compression": "on", "max_wal_size": "4GB", "checkpoint_timeout": "15min"}


def configurations() -> dict[str, dict[str, str]]:
    computed = {k: str(v) for k, v in
                conf.memory_params(schedulers.current().memory_bytes).items()}
    return {"initdb defaults": {}, "pgjob": computed,
            "pgjob + synchronous_commit=off": {**computed, "synchronous_commit": "off"},
            "pgjob + WAL settings": {**computed, **WAL}}


def measure(quick: bool) -> dict:
    workers, trials, rounds = (2, 5, 1) if quick else (4, 150, 3)
    rows = []
    for name, settings in configurations().items():
        runs = []
        with DefaultServer(scratch("settings"), settings) as server:
            for _ in range(rounds):
                runs.append(one_run("plain_default", server.url(), "random", workers, trials))
        rows.append({"settings": name, "changed": settings,
                     "trials_per_s": round(median([r["trials_per_s"] for r in runs]), 1),
                     "latency_ms": percentiles([x for r in runs for x in r["latencies"]])})
    return {"workers": workers, "trials_per_worker": trials, "rounds": rounds, "rows": rows}
