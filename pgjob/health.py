"""The checks behind `pgjob status`: what a person or a script needs to know at a glance."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import psutil
import psycopg

from . import endpoint, schedulers
from .errors import first_line
from .home import Home
from .schema import kind_of_studies, kinds_in_use

HEALTHY, DEGRADED, DOWN = 0, 1, 2
LEVEL_NAMES = {HEALTHY: "healthy", DEGRADED: "degraded", DOWN: "down"}
CONNECTIONS_WARN = 0.8
DISK_FREE_WARN = 0.10

_STUDY_COUNTS = """
select s.study_name, coalesce(t.state::text, ''), count(t.trial_id)
from studies s left join trials t on t.study_id = s.study_id
group by 1, 2 order by 1, 2
"""
NO_OPTUNA_TABLES = "no Optuna tables yet (the first worker's Optuna will create them)"
NO_JOURNAL = "no journal yet (the first worker makes its tables)"

# A journal's trials by state, counted in SQL from its logs, without Optuna and without a
# replay (status runs on a login node and must stay quick on a study of 100k trials).
# Codes as Optuna writes them (optuna.storages.journal JournalOperation, TrialState);
# tests/unit/test_health.py holds them to Optuna's own.
CREATE_STUDY, DELETE_STUDY, CREATE_TRIAL, SET_TRIAL_STATE_VALUES = 0, 1, 4, 6
TRIAL_STATES = {0: "RUNNING", 1: "COMPLETE", 2: "PRUNED", 3: "FAIL", 4: "WAITING"}
FINISHED = (1, 2, 3)
_STUDY_LOGS = f"""
select id, op, case when op = {CREATE_STUDY} then log::jsonb->>'study_name' end, study
from pgjob_journal where op in ({CREATE_STUDY}, {DELETE_STUDY})
order by id
"""
# Optuna's replay numbers a trial by the creations it applied (those whose study was
# alive then); a trial's state is that of its creation when finished, else its first
# finished state (a finished trial takes no more), else its last.
_JOURNAL_COUNTS = f"""
with span (study_id, born, died) as (
    select * from unnest(%(ids)s::int[], %(born)s::bigint[], %(died)s::bigint[])),
created as (
    select s.study_id, coalesce(j.state, 0) as state,
           row_number() over (order by j.id) - 1 as trial_id
    from pgjob_journal j join span s on s.study_id = j.study
        and j.id > s.born and (s.died is null or j.id < s.died)
    where j.op = {CREATE_TRIAL}),
updated as (
    select trial as trial_id,
           (array_agg(state order by id) filter (where state in {FINISHED}))[1] as finished,
           (array_agg(state order by id desc))[1] as last
    from pgjob_journal where op = {SET_TRIAL_STATE_VALUES}
    group by 1)
select c.study_id, case when c.state in {FINISHED} then c.state
                        else coalesce(u.finished, u.last, c.state) end, count(*)
from created c left join updated u using (trial_id)
where c.study_id = any(%(live)s)
group by 1, 2
"""


@dataclass
class Status:
    level: int = HEALTHY
    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def worse(self, level: int, problem: str) -> None:
        self.level = max(self.level, level)
        self.problems.append(problem)

    def as_dict(self) -> dict:
        return {"state": LEVEL_NAMES[self.level], "exit_code": self.level,
                "problems": self.problems, **self.facts}


def _disk(status: Status, home: Home) -> None:
    try:
        usage = psutil.disk_usage(str(home.data))
    except OSError:
        return
    free = usage.free / usage.total if usage.total else 1.0
    status.facts["disk_free_bytes"] = usage.free
    status.facts["disk_free_fraction"] = round(free, 3)
    if free < DISK_FREE_WARN:
        status.worse(DEGRADED, f"only {free:.0%} disk free where the data lives ({home.data})")


def _server_facts(status: Status, conn: psycopg.Connection) -> None:
    version, uptime, used, most, reserved, size = conn.execute(
        "select current_setting('server_version'), "
        "extract(epoch from now() - pg_postmaster_start_time())::float8, "
        "(select count(*) from pg_stat_activity where backend_type = 'client backend'), "
        "current_setting('max_connections')::int, "
        "current_setting('superuser_reserved_connections')::int, "
        "pg_database_size(current_database())").fetchone()
    status.facts.update(server_version=version, uptime_seconds=round(uptime, 1),
                        connections=used, max_connections=most, database_bytes=size)
    usable = most - reserved  # the rest are kept for the superuser
    if used > CONNECTIONS_WARN * usable:
        status.worse(DEGRADED, f"{used} of the {usable} connections workers may use are in "
                               "use; raise --workers with `pgjob init --workers N` and "
                               "restart the server")


def _storage_kind(status: Status, conn: psycopg.Connection, home: Home) -> str:
    """The kind of storage whose studies are shown: the one the database holds, else the
    home's setting. A setting that disagrees with the database is a problem: workers with
    it are refused (schema.check_kind)."""
    setting = home.settings().storage
    try:
        in_use = kinds_in_use(lambda query: conn.execute(query).fetchone())
    except psycopg.Error as exc:  # reported; the setting decides what is shown
        status.worse(DEGRADED, f"cannot tell which kind of studies the database holds "
                               f"({first_line(exc)}): look with `pgjob psql`")
        in_use = []
    kind = kind_of_studies(in_use, setting)
    status.facts["storage"] = kind
    if len(in_use) > 1:
        status.worse(DEGRADED, "the study database holds both rdb and journal studies, so "
                               "every worker is refused; move one kind out with `pgjob "
                               "export` and `pgjob import`")
    elif kind != setting:
        status.worse(DEGRADED, f"the home is set to storage = {setting!r} (pgjob.toml, or "
                               f"PGJOB_STORAGE here), but its database holds {kind} "
                               "studies: a worker with that setting is refused. Use "
                               f"storage = {kind!r} for every worker and command")
    return kind


def _rdb_studies(status: Status, conn: psycopg.Connection) -> None:
    studies: dict[str, dict[str, int]] = {}
    if conn.execute("select to_regclass('public.studies') is not null").fetchone()[0]:
        for name, state, count in conn.execute(_STUDY_COUNTS):
            counts = studies.setdefault(name, {})
            if state:
                counts[state] = count
    status.facts["studies"] = studies


def study_spans(logs) -> dict[int, tuple[str, int, int | None]]:
    """{study id: (name, log that created it, log that deleted it or None)} from a
    journal's study logs (id, op code, study name, study id), numbered as Optuna's replay
    numbers them: a creation whose name a live study has is no study (every worker's
    `create_study(load_if_exists=True)` writes one)."""
    spans: dict[int, tuple[str, int, int | None]] = {}
    live: dict[str, int] = {}
    for log_id, op, name, study_id in logs:
        if op == CREATE_STUDY and name not in live:
            live[name] = len(spans)
            spans[len(spans)] = (name, log_id, None)
        elif op == DELETE_STUDY and study_id in spans and spans[study_id][2] is None:
            name, born, _ = spans[study_id]
            spans[study_id] = (name, born, log_id)
            del live[name]
    return spans


def _journal(status: Status, conn: psycopg.Connection) -> None:
    """A journal home's logs, snapshots and studies' trials by state, in SQL: two scans of
    the logs, whatever their number, and no Optuna. A failure is reported, and the rest of
    the status still stands."""
    try:
        if not conn.execute("select to_regclass('public.pgjob_journal_head') is not null "
                            "and to_regclass('public.pgjob_journal_snapshots') is not null"
                            ).fetchone()[0]:
            status.facts.update(journal=None, studies={})
            return
        logs = conn.execute("select next from pgjob_journal_head").fetchone()[0]
        snapshots = dict(conn.execute("select optuna, upto from pgjob_journal_snapshots "
                                      "order by upto"))
        spans = study_spans(conn.execute(_STUDY_LOGS))
        live = {i: name for i, (name, _, died) in spans.items() if died is None}
        studies: dict[str, dict[str, int]] = {name: {} for name in live.values()}
        for study_id, state, count in conn.execute(_JOURNAL_COUNTS, {
                "ids": list(spans), "born": [s[1] for s in spans.values()],
                "died": [s[2] for s in spans.values()], "live": list(live)}):
            studies[live[study_id]][TRIAL_STATES.get(state, str(state))] = count
    except psycopg.Error as exc:
        reason = first_line(exc)
        status.facts["journal"] = {"error": reason}
        status.worse(DEGRADED, f"cannot read the journal ({reason}); workers may fail the "
                               "same way: look with `pgjob psql`")
        return
    status.facts.update(journal={"logs": logs, "snapshots": snapshots},
                        studies=dict(sorted(studies.items())))


def _optuna_schema(status: Status, conn: psycopg.Connection) -> None:
    """Which Optuna schema the study database has: alembic's revision and what Optuna's
    version_info says (the Optuna that set the tables up). Read as the application role, on
    its own: a failure here is reported, and the rest of the status still stands."""
    try:
        tables = conn.execute("select to_regclass('public.alembic_version') is not null, "
                              "to_regclass('public.version_info') is not null").fetchone()
        if not any(tables):
            status.facts["optuna_schema"] = None
            return
        found = {"alembic_revision": None, "schema_version": None, "library_version": None}
        if tables[0]:
            revisions = [r for (r,) in conn.execute(
                "select version_num from public.alembic_version order by 1")]
            found["alembic_revision"] = ", ".join(revisions) or None
        if tables[1]:
            row = conn.execute("select schema_version, library_version "
                               "from public.version_info limit 1").fetchone()
            if row is not None:
                found["schema_version"], found["library_version"] = row
    except psycopg.Error as exc:
        reason = first_line(exc)
        status.facts["optuna_schema"] = {"error": reason}
        status.worse(DEGRADED, f"cannot read which Optuna schema the study database has "
                               f"({reason}); workers may fail the same way: look with "
                               "`pgjob psql`")
        return
    status.facts["optuna_schema"] = found


def _job(status: Status, home: Home, published) -> None:
    """The server job as the scheduler sees it: from the endpoint, else from `pgjob submit`."""
    if published is not None:
        scheduler_name, job_id = published.scheduler, published.job_id
    else:
        record = home.read_record(home.submitted)
        if "scheduler" not in record or "job_id" not in record:
            return
        scheduler_name, job_id = record["scheduler"], record["job_id"]
    queued = schedulers.query(scheduler_name, job_id)
    if queued is not None:
        status.facts.update(job_id=job_id, job_state=queued.state,
                            time_left_seconds=queued.time_left)


def _modes(status: Status, home: Home) -> None:
    for path, mode in home.loose_modes():
        status.worse(DEGRADED, f"{path} is open to other users (mode {mode:04o}); run "
                               "`pgjob init` to repair the home's modes")


def check(home: Home) -> Status:
    status = Status()
    status.facts["home"] = str(home.path)
    _disk(status, home)
    _modes(status, home)
    published = endpoint.read(home)
    _job(status, home, published)
    if published is None:
        status.facts["published"] = False
        status.worse(DOWN, "no server is published for this home; start one with "
                           "`sbatch jobscripts/pgjob-serve.sh` or `pgjob serve`")
        return status
    status.facts.update(published=True, host=published.host, port=published.port,
                        node=published.node, job_id=published.job_id,
                        scheduler=published.scheduler, generation=published.generation,
                        database=published.database, user=published.user,
                        published_seconds_ago=round(time.time() - published.started_at, 1))
    try:
        with published.connect(timeout=5) as conn:
            _server_facts(status, conn)
            if _storage_kind(status, conn, home) == "journal":
                _journal(status, conn)
            else:
                _rdb_studies(status, conn)
                _optuna_schema(status, conn)
        status.facts["reachable"] = True
    except psycopg.Error as exc:
        status.facts["reachable"] = False
        status.worse(DOWN, f"the server published at {published.host}:{published.port} does "
                           f"not answer: {str(exc).strip().splitlines()[0] if str(exc) else exc}")
    return status


def render(status: Status) -> str:
    """The human-readable form of a status: a headline, then facts, then problems."""
    f = status.facts
    lines = [f"pgjob: {LEVEL_NAMES[status.level]}", f"home:        {f['home']}"]
    if f.get("published"):
        lines.append(f"server:      {f['host']}:{f['port']} (node {f['node']}, job "
                     f"{f['job_id'] or '-'}, generation {f['generation']})")
    if f.get("job_state"):
        left = f.get("time_left_seconds")
        lines.append(f"job:         {f['job_id']} {f['job_state']}"
                     + (f", {_duration(left)} left" if left is not None else ""))
    if "server_version" in f:
        lines += [f"version:     PostgreSQL {f['server_version']}",
                  f"uptime:      {_duration(f['uptime_seconds'])}",
                  f"connections: {f['connections']} of {f['max_connections']}",
                  f"database:    {f['database']} ({f['database_bytes'] / 2**20:.1f} MiB)"]
    if "storage" in f:
        lines.append(f"storage:     {f['storage']}"
                     + (f", {_describe_journal(f['journal'])}" if "journal" in f else ""))
    if "optuna_schema" in f:
        lines.append(f"optuna:      {_describe_schema(f['optuna_schema'])}")
    if "disk_free_bytes" in f:
        lines.append(f"disk free:   {f['disk_free_bytes'] / 2**30:.1f} GiB "
                     f"({f['disk_free_fraction']:.0%})")
    for name, counts in (f.get("studies") or {}).items():
        shown = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
        lines.append(f"study {name}: {shown}")
    lines += [f"problem:     {p}" for p in status.problems]
    return "\n".join(lines)


def _describe_schema(schema: dict | None) -> str:
    if schema is None:
        return NO_OPTUNA_TABLES
    if "error" in schema:
        return f"schema unreadable ({schema['error']})"
    unknown = "-"
    return (f"alembic revision {schema['alembic_revision'] or unknown}, schema_version "
            f"{schema['schema_version'] or unknown}, set up by Optuna "
            f"{schema['library_version'] or unknown}")


def _describe_journal(journal: dict | None) -> str:
    if journal is None:
        return NO_JOURNAL
    if "error" in journal:
        return f"journal unreadable ({journal['error']})"
    snapshots = "; ".join(f"snapshot at log {upto} (Optuna {version})"
                          for version, upto in journal["snapshots"].items())
    return f"{journal['logs']} logs" + (f"; {snapshots}" if snapshots else "; no snapshot")


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"
