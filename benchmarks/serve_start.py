"""How long `pgjob serve` takes from start to a connectable endpoint, against bare
`pg_ctl start -w` on the same data directory (target: at most 1.5x).

Both are timed from the command's start to the moment a client can run a query; pgjob's
time includes its Python start, the node settings, the schema check and publishing.
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

import psycopg

from pgjob import endpoint
from pgjob.home import open_home
from pgjob.initialize import init
from pgjob.serve import pick_port

TARGET = 1.5


def _time_pgjob(home_path: Path) -> float:
    home = open_home(home_path)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pgjob", "serve", "--home", str(home_path),
                             "--host", "127.0.0.1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while True:
        found = endpoint.read(home)
        if found is not None and endpoint.check(found, timeout=2) is None:
            break
        if proc.poll() is not None:
            raise SystemExit("pgjob serve exited during the benchmark")
        time.sleep(0.002)
    elapsed = time.perf_counter() - start
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return elapsed


def _time_pg_ctl(home_path: Path, bindir: Path, port: int) -> float:
    sockdir = tempfile.mkdtemp(prefix="pgjob-bench-")
    data = home_path / "data"
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sockdir}"
    start = time.perf_counter()
    subprocess.run([bindir / "pg_ctl", "start", "-w", "-D", data, "-o", opts, "-l",
                    home_path / "logs" / "bench-pg_ctl.log"], check=True,
                   stdout=subprocess.DEVNULL)
    with psycopg.connect(host="127.0.0.1", port=port, user="optuna", dbname="optuna",
                         passfile=str(home_path / "secrets" / "app.pgpass")) as conn:
        conn.execute("select 1")
    elapsed = time.perf_counter() - start
    subprocess.run([bindir / "pg_ctl", "stop", "-w", "-m", "fast", "-D", data], check=True,
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(sockdir, ignore_errors=True)
    return elapsed


def measure(repeats: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix="pgjob-bench-home-"))
    try:
        home_path = base / "home"
        init(home_path, allow=("127.0.0.1/32",))
        settings = open_home(home_path).settings()
        _time_pgjob(home_path)  # first start makes the Optuna schema; not what we time
        pgjob_times, bare_times = [], []
        for _ in range(repeats):
            pgjob_times.append(_time_pgjob(home_path))
            # the same free-port rule pgjob serve applies, so a busy 5432 cannot fail this
            port = pick_port("127.0.0.1", settings.port)
            bare_times.append(_time_pg_ctl(home_path, Path(settings.pg_bin), port))
        pgjob_s, bare_s = statistics.median(pgjob_times), statistics.median(bare_times)
        return {"repeats": repeats, "pgjob_serve_s": round(pgjob_s, 4),
                "pg_ctl_start_s": round(bare_s, 4), "ratio": round(pgjob_s / bare_s, 2),
                "target_ratio": TARGET, "met": pgjob_s / bare_s <= TARGET}
    finally:
        shutil.rmtree(base, ignore_errors=True)
