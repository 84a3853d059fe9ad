"""A thousand workers on one pgjob server: real connections, each doing a trial's storage
work at a realistic rate, measured from the workers' side.

The load generator is one process with one asyncio task (and one connection, TLS and SCRAM
like every pgjob client) per simulated worker. Every PERIOD seconds a worker does what
Optuna's storage does for one trial (captured from a real study, Optuna 5.0, RandomSampler,
two parameters): finish the previous trial (read it back; lock it, write its state and
value) and start the next (read the trials that are new or were unfinished at its last
look, with their parameters, values and attributes; lock the study, insert the trial,
number it; read it back; two parameters, each after reading the trial), and one heartbeat.
That is 37 statements in 9 transactions, and the trial count grows as in a real study.
Measured: the time of that work per trial (p50/p95/p99), errors, the server's memory.
Target: no errors and p95 under 50 ms.
"""
from __future__ import annotations

import asyncio
import random
import resource
import time

import psycopg
from psycopg import AsyncConnection

import psutil

from common import PgJobInstance, percentiles, scratch, server_cpu_s, server_memory_mb

P95_TARGET_MS = 50.0
CHILDREN = ("trial_values", "trial_params", "trial_intermediate_values",
            "trial_user_attributes", "trial_system_attributes")
TRIAL_COLUMNS = "trial_id, number, study_id, state, datetime_start, datetime_complete"


async def _read_trial(conn: AsyncConnection, trial_id: int) -> None:
    async with conn.transaction():
        await conn.execute(f"select {TRIAL_COLUMNS} from trials where trial_id = %s",
                           (trial_id,))
        for table in CHILDREN:
            await conn.execute(f"select * from {table} where trial_id = %s", (trial_id,))


async def _finish(conn: AsyncConnection, trial_id: int, value: float) -> None:
    await _read_trial(conn, trial_id)
    async with conn.transaction():
        await conn.execute(f"select {TRIAL_COLUMNS} from trials where trial_id = %s "
                           "for update", (trial_id,))
        await conn.execute("select * from trial_values where trial_id = %s and objective = 0",
                           (trial_id,))
        await conn.execute("update trials set state = 'COMPLETE', datetime_complete = now() "
                           "where trial_id = %s", (trial_id,))
        await conn.execute("insert into trial_values (trial_id, objective, value, value_type) "
                           "values (%s, 0, %s, 'FINITE') returning trial_value_id",
                           (trial_id, value))


async def _sync(conn: AsyncConnection, study_id: int, since: int, newest: int) -> None:
    """Read what a worker's cache lacks: every trial after `since` (the last one below
    which all were finished), with its values, parameters and attributes.

    The rows are transferred but not turned into Python objects: a real worker does that
    in its own process, while here one process stands in for a thousand, and its CPU
    would be measured instead of the server."""
    async with conn.transaction():
        await conn.execute("select study_id, study_name from studies where study_id = %s",
                           (study_id,))
        await conn.execute(f"select {TRIAL_COLUMNS} from trials where study_id = %s "
                           "and trial_id > %s order by trial_id", (study_id, since))
        ids = list(range(since + 1, newest + 1))
        for table in CHILDREN:
            await conn.execute(f"select * from {table} where trial_id = any(%s)", (ids,))


async def _start(conn: AsyncConnection, study_id: int) -> int:
    async with conn.transaction():
        await conn.execute("select study_id, study_name from studies where study_id = %s "
                           "for update", (study_id,))
        cur = await conn.execute(
            "insert into trials (number, study_id, state, datetime_start) "
            "values (null, %s, 'RUNNING', now()) returning trial_id", (study_id,))
        trial_id = (await cur.fetchone())[0]
        cur = await conn.execute("select count(trial_id) from trials where study_id = %s "
                                 "and trial_id < %s", (study_id, trial_id))
        number = (await cur.fetchone())[0]
        await conn.execute("update trials set number = %s where trial_id = %s",
                           (number, trial_id))
    await _read_trial(conn, trial_id)
    for name in ("x", "y"):
        async with conn.transaction():
            await conn.execute(f"select {TRIAL_COLUMNS} from trials where trial_id = %s",
                               (trial_id,))
            await conn.execute(
                "insert into trial_params (trial_id, param_name, param_value, "
                "distribution_json) values (%s, %s, %s, %s) returning param_id",
                (trial_id, name, random.uniform(-10, 10),
                 '{"name": "FloatDistribution", "attributes": {"step": null, '
                 '"low": -10.0, "high": 10.0, "log": false}}'))
    async with conn.transaction():
        await conn.execute("set local synchronous_commit = off")
        await conn.execute("insert into trial_heartbeats (trial_id, heartbeat) "
                           "values (%s, now()) on conflict (trial_id) do update "
                           "set heartbeat = excluded.heartbeat", (trial_id,))
    return trial_id


class Load:
    def __init__(self, conninfo: str, study_id: int, workers: int, period: float,
                 duration: float, pooled: bool) -> None:
        self.conninfo, self.study_id, self.workers = conninfo, study_id, workers
        self.period, self.duration = period, duration
        self.prepare = None if pooled else 5  # pgbouncer 1.18 cannot keep prepared statements
        self.latencies: list[float] = []
        self.connect_times: list[float] = []
        self.errors: list[str] = []
        self.running: set[int] = set()  # what Optuna's cache would know: unfinished trials
        self.newest = 0

    def since(self) -> int:
        """The id below which every trial is finished."""
        return min(self.running) - 1 if self.running else self.newest

    async def _connect(self, gate: asyncio.Semaphore) -> AsyncConnection | None:
        async with gate:
            start = time.perf_counter()
            try:
                conn = await AsyncConnection.connect(self.conninfo, autocommit=True,
                                                     prepare_threshold=self.prepare)
            except psycopg.Error as exc:
                self.errors.append(f"connect: {str(exc).strip().splitlines()[0]}")
                return None
            self.connect_times.append(time.perf_counter() - start)
            return conn

    async def _worker(self, conn: AsyncConnection, until: float) -> None:
        await asyncio.sleep(random.uniform(0, self.period))
        trial = None
        while time.perf_counter() < until:
            start = time.perf_counter()
            try:
                if trial is not None:
                    await _finish(conn, trial, random.random())
                    self.running.discard(trial)
                await _sync(conn, self.study_id, self.since(), self.newest)
                trial = await _start(conn, self.study_id)
                self.running.add(trial)
                self.newest = max(self.newest, trial)
            except psycopg.Error as exc:
                self.errors.append(str(exc).strip().splitlines()[0])
                trial = None
            took = time.perf_counter() - start
            self.latencies.append(took)
            await asyncio.sleep(max(0.0, self.period - took))

    async def run(self, on_connected, server_cpu) -> dict:
        gate = asyncio.Semaphore(16)
        began = time.perf_counter()
        conns = await asyncio.gather(*(self._connect(gate) for _ in range(self.workers)))
        connected = time.perf_counter() - began
        conns = [c for c in conns if c is not None]
        until = time.perf_counter() + self.duration
        cpu, server_before = time.process_time(), server_cpu()
        middle = asyncio.get_running_loop().call_later(
            self.duration / 2, lambda: self.__setattr__("memory", on_connected()))
        await asyncio.gather(*(self._worker(c, until) for c in conns))
        server_s = server_cpu() - server_before
        middle.cancel()
        for conn in conns:
            await conn.close()
        self.cpu_s = time.process_time() - cpu
        return {"workers": self.workers, "connected": len(conns),
                "connect_all_s": round(connected, 1),
                "connect_ms": percentiles(self.connect_times),
                "trials": len(self.latencies), "errors": len(self.errors),
                "first_errors": sorted(set(self.errors))[:3],
                "latency_ms": percentiles(self.latencies),
                "generator_cpu_share": round(self.cpu_s / self.duration, 2),
                "server_cpu_share": round(server_s / self.duration, 2),
                "server_memory": getattr(self, "memory", None)}


def _study(instance: PgJobInstance) -> int:
    import optuna

    storage = optuna.storages.RDBStorage(instance.url())
    study = optuna.create_study(storage=storage, study_name="scale")
    storage.engine.dispose()
    return study._study_id


def run_mode(workers: int, period: float, duration: float, pooled: bool) -> dict:
    with PgJobInstance(scratch("scale"), workers=workers, pooler=pooled) as instance:
        study_id = _study(instance)
        load = Load(instance.endpoint.libpq_url() + "&application_name=pgjob-scale",
                    study_id, workers, period, duration, pooled)
        result = asyncio.run(load.run(
            lambda: server_memory_mb(instance.endpoint.pid, instance.pooler_pids()),
            lambda: server_cpu_s(instance.endpoint.pid) + sum(
                sum(psutil.Process(p).cpu_times()[:2]) for p in instance.pooler_pids())))
    result["met"] = result["errors"] == 0 and result["latency_ms"]["p95"] < P95_TARGET_MS
    return result


def measure(quick: bool, pooler: bool) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per worker
    workers, period, duration = (20, 1.0, 4.0) if quick else (1000, 30.0, 95.0)
    modes = {"direct": run_mode(workers, period, duration, pooled=False)}
    if pooler:
        modes["pgbouncer"] = run_mode(workers, period, duration, pooled=True)
    # The same work with nothing else going on: one worker, one trial every 0.5 s.
    floor = run_mode(1, 0.5, 2.0 if quick else 30.0, pooled=False)
    return {"period_s": period, "duration_s": duration, "modes": modes, "floor": floor,
            "target": f"no errors and p95 < {P95_TARGET_MS:.0f} ms"}
