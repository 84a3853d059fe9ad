"""The application role cannot climb: no superuser statement ever runs on its objects.

Workers log in as the application role, which owns the study database and everything in
it. A trigger, default or index expression it writes runs with the rights of whoever fires
it, so serve's own work in that database (the heartbeat refresh after a restart, the
stale-trial sweep, the schema) must run as that role, never as the superuser.
"""
import os
import signal

import psycopg
import pytest

import pgjob
from pgjob.waiting import until

pytestmark = pytest.mark.pg

TRAP = """
create function public.climb() returns trigger language plpgsql as $$
begin
    begin
        execute 'alter role optuna superuser';  -- works only if a superuser fires this
    exception when others then null;
    end;
    return new;
end $$;
create trigger climb before update on trial_heartbeats
    for each row execute function public.climb();
"""


def superuser(conn) -> bool:
    return conn.execute("select rolsuper from pg_roles where rolname = current_user"
                        ).fetchone()[0]


def test_a_trigger_the_app_role_plants_never_runs_as_the_superuser(server):
    found = server.endpoint()
    pgjob.optuna_storage(server.home.path, wait=30).engine.dispose()  # the first worker's tables
    with found.connect() as conn:
        conn.execute("insert into studies (study_name) values ('bait') returning study_id")
        study = conn.execute("select study_id from studies where study_name = 'bait'"
                             ).fetchone()[0]
        trial = conn.execute(
            "insert into trials (number, study_id, state, datetime_start) "
            "values (0, %s, 'RUNNING', now()) returning trial_id", (study,)).fetchone()[0]
        conn.execute("insert into trial_heartbeats (trial_id, heartbeat) "
                     "values (%s, now() - interval '1 hour')", (trial,))
        conn.execute(TRAP)
        assert not superuser(conn)
    # serve restarts a dead postmaster and refreshes running trials' heartbeats: the
    # trigger fires then, as whoever serve works as in the study database
    os.kill(found.pid, signal.SIGKILL)
    again = until(lambda: (e := server.endpoint()) and e.generation > found.generation and e,
                  60, interval=0.2)
    assert again, server.log.read_text()
    with again.connect() as conn:
        refreshed = conn.execute("select heartbeat > now() - interval '1 minute' from "
                                 "trial_heartbeats where trial_id = %s", (trial,)).fetchone()
        assert refreshed == (True,)  # the refresh did run, and fired the trigger
        assert not superuser(conn)


def test_the_app_role_cannot_run_programs_on_the_server(server):
    with server.endpoint().connect() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("copy (select 1) to program 'id'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("alter role optuna superuser")
