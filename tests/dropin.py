"""What the drop-in storage tests (issue 12) read from the study database and run beside
themselves: the rows a user would see in `pgjob psql`, and small real client processes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# A worker process: `python script HOME STUDY TRIALS PAUSE` runs TRIALS trials of a cheap
# objective that sleeps PAUSE seconds, through pgjob's storage of HOME.
WORKER_SCRIPT = """
import sys, time, optuna, pgjob
optuna.logging.set_verbosity(optuna.logging.WARNING)
home, study_name, trials, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
study = optuna.create_study(storage=pgjob.optuna_storage(home, wait=120),
                            study_name=study_name, load_if_exists=True)
def objective(trial):
    x = trial.suggest_float("x", -1, 1)
    time.sleep(pause)
    return x * x
study.optimize(objective, n_trials=trials)
print("worker finished", flush=True)
"""


def states(found, study: str) -> dict[str, int]:
    """How many trials of `study` are in each state."""
    with found.connect() as conn:
        return dict(conn.execute(
            "select t.state::text, count(*) from trials t join studies s using (study_id) "
            "where s.study_name = %s group by 1", (study,)).fetchall())


def trial_ids(found, study: str) -> list[int]:
    """The database ids of `study`'s trials, by number."""
    with found.connect() as conn:
        return [row[0] for row in conn.execute(
            "select t.trial_id from trials t join studies s using (study_id) "
            "where s.study_name = %s order by t.number", (study,)).fetchall()]


def beat(found, trial_id: int):
    """The last pgjob heartbeat of a trial (its `pgjob_heartbeats.beat`), None if it has no row."""
    with found.connect() as conn:
        row = conn.execute("select beat from pgjob_heartbeats where trial_id = %s",
                           (trial_id,)).fetchone()
    return row[0] if row else None


def rows_for(found, ids) -> list[int]:
    """Which of `ids` have a row in pgjob_heartbeats."""
    with found.connect() as conn:
        return [row[0] for row in conn.execute(
            "select trial_id from pgjob_heartbeats where trial_id = any(%s) order by 1",
            (list(ids),)).fetchall()]


def start_script(tmp_path: Path, name: str, code: str, *args) -> tuple[subprocess.Popen, Path]:
    """`code` run by this venv's python in a process of its own; its output goes to a log."""
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(script), *map(str, args)],
                                   stdout=out, stderr=subprocess.STDOUT)
    return process, log
