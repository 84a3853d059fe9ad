"""What the resilience of pgjob's storage costs and buys, on one machine.

1. Recovery: a worker runs a study; the server (serve and postmaster) is killed outright
   and a new `pgjob serve` started at once. Measured: time until the new server is
   published (the restart), and until the worker completes a trial on it.
   Target: recovery at most restart + 5 s.
2. Throughput: trials/s of worker processes using `pgjob.optuna_storage()` against a plain
   `RDBStorage(url)` on the same server. Target: at least 0.95x.
"""
from __future__ import annotations

import shutil
import signal
import statistics
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
THROUGHPUT_TARGET = 0.95

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


def _rate(home_path: Path, script: Path, kind: str, workers: int, trials: int, tag: str) -> float:
    procs = [subprocess.Popen([sys.executable, str(script), str(home_path), kind,
                               f"{kind}-{tag}", str(trials)], stdout=subprocess.PIPE, text=True)
             for _ in range(workers)]
    elapsed = [float(p.communicate()[0].strip()) for p in procs]
    return workers * trials / max(elapsed)


def throughput(home_path: Path, script: Path, workers: int, trials: int, rounds: int) -> dict:
    serve = _serve(home_path)
    endpoint.wait_connectable(open_home(home_path), 60)
    rates: dict[str, list[float]] = {"pgjob": [], "plain": []}
    try:
        for r in range(rounds):
            for kind in ("plain", "pgjob"):  # alternate so drift hits both alike
                rates[kind].append(_rate(home_path, script, kind, workers, trials, str(r)))
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    pgjob_rate, plain_rate = statistics.median(rates["pgjob"]), statistics.median(rates["plain"])
    return {"workers": workers, "trials_per_worker": trials, "rounds": rounds,
            "pgjob_trials_per_s": round(pgjob_rate, 1), "plain_trials_per_s": round(plain_rate, 1),
            "ratio": round(pgjob_rate / plain_rate, 3), "target_ratio": THROUGHPUT_TARGET,
            "met": pgjob_rate / plain_rate >= THROUGHPUT_TARGET}


def measure(quick: bool) -> dict:
    base = Path(tempfile.mkdtemp(prefix="pgjob-bench-res-"))
    try:
        home_path = base / "home"
        init(home_path, allow=("127.0.0.1/32",))
        script = base / "worker.py"
        script.write_text(WORKER)
        return {"recovery": recovery(home_path, script),
                "throughput": throughput(home_path, script, workers=2,
                                         trials=20 if quick else 200, rounds=1 if quick else 3)}
    finally:
        shutil.rmtree(base, ignore_errors=True)
