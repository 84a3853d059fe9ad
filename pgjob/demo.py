"""`pgjob demo`: the whole flow on one machine, with no scheduler.

A temporary home, a server in the background, a few local Optuna workers that find it
through pgjob, a short study, the status, and a clean stop.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from . import binaries, endpoint, health, proc
from .cluster import cluster_state
from .home import open_home
from .control import request_stop

STUDY = "pgjob-demo"


def objective(trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    y = trial.suggest_float("y", -10, 10)
    return (x - 2) ** 2 + (y + 1) ** 2


def worker(home: str, trials: int) -> None:
    """One worker process, written as a user would write it."""
    import optuna

    import pgjob

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=pgjob.optuna_storage(home, wait=60),
                                study_name=STUDY, load_if_exists=True)
    study.optimize(objective, n_trials=trials)


def _pgjob(*args: str) -> list[str]:
    return [sys.executable, "-m", "pgjob", *args]


def run_demo(*, workers: int, trials: int, keep: bool, say: Callable[[str], None],
             started_as_root_for: str = "") -> int:
    """The demo, as the current user (`started_as_root_for`: the account pgjob, started
    as root, has become)."""
    base = Path(tempfile.mkdtemp(prefix="pgjob-demo-"))
    home_path = base / "home"
    serve_log = base / "serve.log"
    say(f"1. pgjob init --home {home_path} --allow 127.0.0.1/32")
    proc.run(_pgjob("init", "--home", str(home_path), "--allow", "127.0.0.1/32",
                    "--workers", str(max(workers, 4))), timeout=300, what="pgjob init failed")
    say(f"   PostgreSQL from {binaries.find()}"
        + (f", running as {started_as_root_for} (pgjob runs as root)"
           if started_as_root_for else ""))
    say("2. pgjob serve --host 127.0.0.1 &   (in a batch job: sbatch jobscripts/pgjob-serve.sh)")
    with open(serve_log, "w") as out:
        server = subprocess.Popen(_pgjob("serve", "--home", str(home_path), "--host",
                                         "127.0.0.1"), stdout=out, stderr=subprocess.STDOUT)
    home = open_home(home_path)
    ok = False
    try:
        found = endpoint.wait_connectable(home, timeout=120)
        say(f"3. pgjob url --wait 60  ->  {found.sqlalchemy_url()}")
        each = [trials // workers + (i < trials % workers) for i in range(workers)]
        say(f"4. {workers} Optuna workers run {trials} trials through pgjob.optuna_storage()")
        procs = [subprocess.Popen([sys.executable, "-m", "pgjob.demo", str(home_path), str(n)])
                 for n in each]
        ok = all(p.wait() == 0 for p in procs)
        import optuna

        study = optuna.load_study(study_name=STUDY, storage=found.sqlalchemy_url())
        say(f"   best value {study.best_value:.4f} with {study.best_params}")
        say("5. pgjob status")
        say("   " + health.render(health.check(home)).replace("\n", "\n   "))
    finally:
        say("6. pgjob stop --wait 60")
        stopped = request_stop(home_path, wait=60).stopped
        server.wait(30)
    state = cluster_state(binaries.find(home.settings().pg_bin), home.data)
    say(f"   server stopped: {stopped}; pg_controldata says: {state}")
    ok = ok and stopped and state == "shut down" and server.returncode == 0
    if not ok:
        say(f"the demo failed; the server's log is in {serve_log} and {home.server_log}")
    if keep or not ok:
        say(f"kept the demo home in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    say("demo finished: OK" if ok else "demo finished: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
