"""How long a new worker needs to join a large study on a journal home: a 10k- and a
100k-trial study (prefill.py: 4 logs per trial, as Optuna writes them), timed in a new
process (joiner.py join) from `pgjob.optuna_storage()` to its first `study.ask()`
returning, in three cases:

- a fresh snapshot: one saved just before (by joiner.py grow);
- the oldest snapshot pgjob's throttle leaves in place: a worker saves a new one only once
  the journal has grown by a quarter since the last (journal.SNAPSHOT_MIN_LOGS), so a
  joining worker may find one made at 80 % of the study, and replay the last 20 % of its
  logs after loading it;
- no snapshot (none saved yet, or the home's key is missing): the whole journal replayed.

Also: the size of the snapshot, and the stall of the ask that saved it (Optuna pickles its
state, pgjob signs and uploads it).
Target: a new worker ready in under 5 s on a 100k-trial study with a snapshot in place.
"""
from __future__ import annotations

import prefill
from common import PgJobInstance, median, run_json, scratch
from journal_size import grow

READY_TARGET_S = 5.0
TARGET_SIZE = 100_000
OLDEST = 0.8  # the share of the study the oldest snapshot still in place covers


def join(home: str, study: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        runs.append(run_json("joiner.py", "join", home, study))
    result = {key: round(median([r[key] for r in runs]), 2)
              for key in ("imports_s", "storage_s", "study_s", "ask_s", "ready_s")}
    result["snapshot_loaded"] = all(r["snapshot_loaded"] for r in runs)
    return result


def _snapshot(conn) -> dict:
    upto, size = conn.execute("select upto, octet_length(body) from pgjob_journal_snapshots"
                              ).fetchone()
    logs = conn.execute("select next from pgjob_journal_head").fetchone()[0]
    return {"upto": upto, "logs": logs, "mb": round(size / 2**20, 1)}


def one_size(instance: PgJobInstance, size: int, repeats: int) -> dict:
    home, study = str(instance.home_path), f"join-{size}"
    with instance.endpoint.connect() as conn:
        prefill.fill_journal(conn, study, int(size * OLDEST))
        grow(home, study)
        # one trial more than `size`: the joiners' trials then miss Optuna's every 100th,
        # at which one of them would save a snapshot while being timed
        prefill.fill_journal(conn, study, size - int(size * OLDEST), new=False)
        oldest = {**join(home, study, repeats), **_snapshot(conn)}
        saved = grow(home, study)
        fresh = {**join(home, study, repeats), **_snapshot(conn)}
        conn.execute("delete from pgjob_journal_snapshots")
        none = join(home, study, repeats)
    return {"trials": size, "fresh": fresh, "oldest": oldest, "none": none,
            "save_s": round(saved["slowest_ask_s"], 2)}


def measure(quick: bool) -> dict:
    sizes, repeats = ((2_500,), 1) if quick else ((10_000, 100_000), 3)
    with PgJobInstance(scratch("journal-join"), storage="journal") as instance:
        rows = [one_size(instance, size, repeats) for size in sizes]
    at = next((r for r in rows if r["trials"] == TARGET_SIZE), rows[-1])
    return {"repeats": repeats, "rows": rows, "targets": {
        f"new worker ready < {READY_TARGET_S:.0f} s on a {at['trials']:,}-trial study, "
        "snapshot in place": max(at["fresh"]["ready_s"], at["oldest"]["ready_s"])
        < READY_TARGET_S}}
