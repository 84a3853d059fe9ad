"""A cold start, pgjob against the bare steps it replaces, and a warm restart.

- pgjob: `pgjob init` (a new home, its role and an empty database), then the first
  `pgjob serve` until a client can connect, then the first worker's
  `pgjob.optuna_storage()`, which makes Optuna's tables (pgjob's prepared copy);
- bare: `initdb`, `pg_ctl start -w`, `createdb`, and Optuna creating its schema (what the
  wiki recipes do, without pgjob's TLS, passwords and settings);
- restart: `pgjob serve` on an existing home against `pg_ctl start -w` on the same data
  directory, both timed to the first query (median of several);
- initdb with and without --no-sync, to see whether skipping the sync pays here.

Targets: serve within 1.5x of pg_ctl start; init plus first serve under 2 s.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from common import median, scratch
from pgjob import binaries, endpoint
from pgjob.home import open_home
from pgjob.netinfo import pick_port

RESTART_TARGET = 1.5
COLD_TARGET_S = 2.0


def _timed(argv: list, **kw) -> float:
    start = time.perf_counter()
    subprocess.run([str(a) for a in argv], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - start


def _serve_until_connectable(home_path: Path, then=None) -> float:
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
    if then is not None:
        then()
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    return elapsed


def _pg_ctl_until_connectable(bindir: Path, data: Path, port: int, sockdir: Path,
                              query: dict) -> float:
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sockdir}"
    start = time.perf_counter()
    subprocess.run([bindir / "pg_ctl", "start", "-w", "-D", data, "-o", opts, "-l",
                    sockdir / "pg_ctl.log"], check=True, stdout=subprocess.DEVNULL)
    with psycopg.connect(host="127.0.0.1", port=port, **query) as conn:
        conn.execute("select 1")
    return time.perf_counter() - start


def _stop(bindir: Path, data: Path) -> None:
    subprocess.run([bindir / "pg_ctl", "stop", "-w", "-m", "fast", "-D", data], check=True,
                   stdout=subprocess.DEVNULL)


def cold_pgjob(base: Path) -> dict:
    home_path = base / "home"
    init_s = _timed([sys.executable, "-m", "pgjob", "init", "--home", home_path,
                     "--allow", "127.0.0.1/32"])
    worker = {}

    def first_worker():
        worker["s"] = _timed([sys.executable, "-c", "import pgjob, sys; "
                              "pgjob.optuna_storage(sys.argv[1]).engine.dispose()", home_path])
    serve_s = _serve_until_connectable(home_path, then=first_worker)
    return {"init_s": round(init_s, 3), "first_serve_s": round(serve_s, 3),
            "first_worker_s": round(worker["s"], 3),
            "total_s": round(init_s + serve_s + worker["s"], 3)}


def cold_bare(base: Path, bindir: Path) -> dict:
    data, port = base / "bare", pick_port("127.0.0.1", 5432)
    initdb_s = _timed([bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres"])
    start_s = _pg_ctl_until_connectable(bindir, data, port, base,
                                        {"user": "postgres", "dbname": "postgres"})
    createdb_s = _timed([bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres",
                         "optuna"])
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/optuna"
    schema_s = _timed([sys.executable, "-c", "import optuna, sys; "
                       "optuna.storages.RDBStorage(sys.argv[1]).engine.dispose()", url])
    _stop(bindir, data)
    steps = {"initdb_s": initdb_s, "pg_ctl_start_s": start_s, "createdb_s": createdb_s,
             "optuna_schema_s": schema_s}
    return {**{k: round(v, 3) for k, v in steps.items()},
            "total_s": round(sum(steps.values()), 3)}


def initdb_sync(base: Path, bindir: Path, repeats: int) -> dict:
    times: dict[str, list[float]] = {"sync": [], "no_sync": []}
    for i in range(repeats):
        for kind, flags in (("sync", []), ("no_sync", ["--no-sync"])):
            times[kind].append(_timed([bindir / "initdb", *flags, "-D",
                                       base / f"initdb-{kind}-{i}", "-U", "postgres"]))
    return {f"initdb_{k}_s": round(median(v), 3) for k, v in times.items()}


def restart(base: Path, bindir: Path, repeats: int) -> dict:
    home_path = base / "home"
    settings = open_home(home_path).settings()
    query = {"user": settings.user, "dbname": settings.database,
             "passfile": str(home_path / "secrets" / "app.pgpass")}
    pgjob_times, bare_times = [], []
    for _ in range(repeats):
        pgjob_times.append(_serve_until_connectable(home_path))
        port = pick_port("127.0.0.1", settings.port)
        sockdir = scratch("sock")
        bare_times.append(_pg_ctl_until_connectable(bindir, home_path / "data", port,
                                                    sockdir, query))
        _stop(bindir, home_path / "data")
    pgjob_s, bare_s = median(pgjob_times), median(bare_times)
    return {"repeats": repeats, "pgjob_serve_s": round(pgjob_s, 3),
            "pg_ctl_start_s": round(bare_s, 3), "ratio": round(pgjob_s / bare_s, 2)}


def measure(quick: bool) -> dict:
    repeats = 2 if quick else 10
    bindir = binaries.find()
    colds, bares = [], []
    for _ in range(1 if quick else 3):
        base = scratch("cold")
        colds.append(cold_pgjob(base))
        bares.append(cold_bare(base, bindir))
    pgjob = min(colds, key=lambda r: r["total_s"])  # the run least disturbed
    bare = min(bares, key=lambda r: r["total_s"])
    warm = restart(base, bindir, repeats)
    return {"cold_pgjob": pgjob, "cold_bare": bare, "restart": warm,
            "initdb": initdb_sync(base, bindir, 1 if quick else 3),
            "targets": {"serve within 1.5x of pg_ctl start": warm["ratio"] <= RESTART_TARGET,
                        "init plus first serve under 2 s": pgjob["total_s"] < COLD_TARGET_S}}
