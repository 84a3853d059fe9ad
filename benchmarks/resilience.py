"""What the resilience of pgjob's storage buys: a worker runs a study; the server (serve and
postmaster) is killed outright and a new `pgjob serve` started at once. Measured: time
until the new server is published (the restart), and until the worker completes a trial
on it. Target: recovery at most restart + 5 s. (What it costs in throughput is in
throughput.py.)
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pgjob import endpoint
from pgjob.home import open_home
from pgjob.initialize import init
from pgjob.waiting import until

RECOVERY_SLACK = 5.0

WORKER = """
import sys, time, optuna, pgjob
optuna.logging.set_verbosity(optuna.logging.WARNING)
home, kind, study_name, trials = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if kind == "pgjob":
    storage = pgjob.optuna_storage(home)
else:
    storage = optuna.storages.RDBStorage(pgjob.endpoint.read(pgjob.home.open_home(home)).sqlalchemy_url())
study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                            sampler=optuna.samplers.RandomSampler())
start = time.perf_counter()
study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2 + t.suggest_float("y", -1, 1) ** 2,
               n_trials=trials)
print(time.perf_counter() - start)
"""


def _serve(home_path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pgjob", "serve", "--home", str(home_path),
                             "--host", "127.0.0.1", "--health-interval", "0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _completed(found: endpoint.Endpoint, study: str) -> int:
    try:
        with found.connect(timeout=2) as conn:
            return conn.execute("select count(*) from trials join studies using (study_id) "
                                "where study_name = %s and state = 'COMPLETE'",
                                (study,)).fetchone()[0]
    except Exception:
        return -1


def recovery(home_path: Path, script: Path) -> dict:
    home = open_home(home_path)
    serve = _serve(home_path)
    first = endpoint.wait_connectable(home, 60)
    worker = subprocess.Popen([sys.executable, str(script), str(home_path), "pgjob",
                               "recovery", "100000"], stdout=subprocess.DEVNULL)
    until(lambda: _completed(first, "recovery") >= 50, 60)
    postmaster = psutil.Process(first.pid)
    killed = time.perf_counter()
    serve.send_signal(signal.SIGKILL)
    postmaster.kill()
    serve.wait()
    serve = _serve(home_path)
    second = endpoint.wait_connectable(home, 120)
    restarted = time.perf_counter()
    baseline = _completed(second, "recovery")
    until(lambda: _completed(second, "recovery") > baseline, 60, interval=0.02)
    progressed = time.perf_counter()
    worker.kill()
    serve.send_signal(signal.SIGTERM)
    serve.wait(60)
    restart_s, recovery_s = restarted - killed, progressed - killed
    return {"restart_s": round(restart_s, 2), "recovery_s": round(recovery_s, 2),
            "target": f"recovery <= restart + {RECOVERY_SLACK:.0f} s",
            "met": recovery_s <= restart_s + RECOVERY_SLACK}


def measure(_quick: bool) -> dict:
    base = Path(tempfile.mkdtemp(prefix="pgjob-bench-res-"))
    try:
        home_path = base / "home"
        init(home_path, allow=("127.0.0.1/32",))
        script = base / "worker.py"
        script.write_text(WORKER)
        return recovery(home_path, script)
    finally:
        shutil.rmtree(base, ignore_errors=True)
