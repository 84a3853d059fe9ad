"""What every benchmark needs: a pgjob instance, a default-configured PostgreSQL to compare
against, and a set of worker processes that start together."""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pgjob import binaries, endpoint
from pgjob.home import open_home
from pgjob.initialize import init
from pgjob.netinfo import pick_port

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """p50/p95/p99 (in ms by default) of a list of seconds."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale, 2)
    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def server_memory_mb(postmaster_pid: int, extra_pids: tuple[int, ...] = ()) -> dict:
    """The server's memory: PSS (shared pages split among the processes that map them,
    so shared_buffers counts once) summed over the postmaster and its children."""
    procs = [psutil.Process(postmaster_pid)]
    procs += procs[0].children(recursive=True) + [psutil.Process(p) for p in extra_pids]
    pss = rss = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        pss, rss = pss + info.pss, rss + info.rss
    return {"processes": len(procs), "pss_mb": round(pss / 2**20, 1),
            "rss_mb": round(rss / 2**20, 1)}


def server_cpu_s(postmaster_pid: int) -> float:
    """CPU seconds used so far by a PostgreSQL server: the postmaster, the backends it has
    reaped (counted in its children's times) and those still running."""
    try:
        postmaster = psutil.Process(postmaster_pid)
        total = sum(postmaster.cpu_times()[:4])
        for child in postmaster.children():
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
    except psutil.Error:
        return 0.0
    return total


@dataclass
class PgJobInstance:
    """A pgjob home in a scratch directory and a `pgjob serve` on loopback; `storage` is
    the home's setting ("rdb", or "journal" for a journal home)."""

    base: Path
    workers: int = 64
    pooler: bool = False
    storage: str = "rdb"
    serve: subprocess.Popen | None = None

    @property
    def home_path(self) -> Path:
        return self.base / f"home-{self.storage}"

    def __enter__(self) -> "PgJobInstance":
        init(self.home_path, allow=("127.0.0.1/32",), workers=self.workers,
             storage=self.storage)
        env = {**os.environ, "PGJOB_POOLER": "pgbouncer" if self.pooler else "none"}
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "pgjob", "serve", "--home", str(self.home_path),
             "--host", "127.0.0.1"], stdout=subprocess.DEVNULL,
            stderr=open(self.base / f"serve-{self.storage}.log", "a"), env=env)
        self.endpoint = endpoint.wait_connectable(open_home(self.home_path), 60)
        return self

    def url(self) -> str:
        return self.endpoint.sqlalchemy_url()

    def pooler_pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in psutil.Process(self.serve.pid).children()
                     if p.name() == "pgbouncer")

    def __exit__(self, *_exc) -> None:
        self.serve.send_signal(signal.SIGTERM)
        self.serve.wait(120)


@dataclass
class DefaultServer:
    """PostgreSQL as initdb leaves it (default postgresql.conf), on loopback, trust auth:
    what a plain RDBStorage meets on a hand-made server. `settings` adds -c options."""

    base: Path
    settings: dict[str, str] = field(default_factory=dict)

    def __enter__(self) -> "DefaultServer":
        self.bindir = binaries.find()
        self.data = self.base / "default-data"
        self.port = pick_port("127.0.0.1", 5432)
        subprocess.run([self.bindir / "initdb", "-D", self.data, "-A", "trust", "-U",
                        "postgres", "--no-locale", "-E", "UTF8"], check=True,
                       stdout=subprocess.DEVNULL)
        opts = [f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.base}"]
        opts += [f"-c {k}={v}" for k, v in self.settings.items()]
        subprocess.run([self.bindir / "pg_ctl", "start", "-w", "-D", self.data, "-o",
                        " ".join(opts), "-l", self.base / "default.log"], check=True,
                       stdout=subprocess.DEVNULL)
        import psycopg
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", autocommit=True) as conn:
            conn.execute("create database optuna")
        import optuna  # its tables, made once, so that the workers do not race to
        optuna.storages.RDBStorage(self.url()).engine.dispose()
        return self

    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/optuna"

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def __exit__(self, *_exc) -> None:
        subprocess.run([self.bindir / "pg_ctl", "stop", "-w", "-m", "fast", "-D", self.data],
                       check=True, stdout=subprocess.DEVNULL)


def run_json(script: str, *args: str, timeout: float = 600) -> dict:
    """Run benchmarks/`script` with `args` in a new Python; the JSON line it prints."""
    done = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout)


ROOT = Path(tempfile.mkdtemp(prefix="pgjob-bench-"))  # run.py removes it at the end


def scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=ROOT))


@dataclass
class Workers:
    """N worker processes that set up, then start their trials together on "go"."""

    argv: list[str]
    count: int
    env: list[dict[str, str]] | None = None
    procs: list[subprocess.Popen] = field(default_factory=list)

    def start(self, command: str = "go") -> float:
        """Start them, wait until all are ready, release them; returns the release time."""
        for i in range(self.count):
            env = {**os.environ, **(self.env[i] if self.env else {})}
            self.procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), *self.argv], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, env=env))
        for proc in self.procs:
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise SystemExit(f"a benchmark worker failed to start ({self.argv})")
        released = time.perf_counter()
        for proc in self.procs:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        return released

    def results(self) -> list[dict]:
        return [json.loads(proc.stdout.readline()) for proc in self.procs]

    def finish(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write("exit\n")
                proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
            proc.wait(60)
