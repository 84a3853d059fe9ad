"""`pgjob init`: a home with safe modes, a least-privileged role, and safe to run twice."""
import json
import os
import stat

import psycopg
import pytest
from pytest_postgresql import factories

from conftest import Served, run_pgjob
from pgjob import binaries, schema
from pgjob.home import open_home

pytestmark = pytest.mark.pg


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_home_layout_and_modes(home_path):
    assert mode(home_path) == 0o700
    assert mode(home_path / "secrets") == 0o700
    assert mode(home_path / "data") == 0o700
    for secret in (home_path / "secrets").iterdir():
        assert mode(secret) == 0o600, secret
    assert mode(home_path / "pgjob.toml") == 0o600
    assert (home_path / "data" / "PG_VERSION").read_text().strip().isdigit()


def test_app_role_is_not_superuser_and_owns_the_database(server):
    with server.endpoint().connect() as conn:
        superuser, createrole, createdb = conn.execute(
            "select rolsuper, rolcreaterole, rolcreatedb from pg_roles "
            "where rolname = current_user").fetchone()
        owner = conn.execute("select pg_get_userbyid(datdba) from pg_database "
                             "where datname = current_database()").fetchone()[0]
    assert (superuser, createrole, createdb) == (False, False, False)
    assert owner == "optuna"


def test_cluster_is_utf8_with_a_fixed_locale(server):
    with server.endpoint().connect() as conn:
        enc, collate = conn.execute("select pg_encoding_to_char(encoding), datcollate "
                                    "from pg_database where datname = current_database()"
                                    ).fetchone()
    assert (enc, collate) == ("UTF8", "C")


def test_init_twice_keeps_the_data_and_applies_new_settings(home_path, tmp_path):
    served = Served(home_path, tmp_path / "one.log")
    with served.endpoint().connect() as conn:
        conn.execute("create table kept (v int); insert into kept values (7)")
    served.stop()
    done = run_pgjob("init", "--home", str(home_path), "--workers", "40", check=True)
    assert "checked and repaired" in done.stdout
    served = Served(home_path, tmp_path / "two.log")
    with served.endpoint().connect() as conn:
        assert conn.execute("select v from kept").fetchone() == (7,)
        assert conn.execute("show max_connections").fetchone()[0] == str(2 * 40 + 8)
    assert served.stop() == 0


def test_init_repairs_loosened_modes_and_a_lost_hba_block(home_path):
    os.chmod(home_path / "secrets" / "app.pgpass", 0o644)
    hba = home_path / "data" / "pg_hba.conf"
    hba.write_text("# user's own line\nlocal all all peer\n")
    run_pgjob("init", "--home", str(home_path), check=True)
    assert mode(home_path / "secrets" / "app.pgpass") == 0o600
    text = hba.read_text()
    assert "BEGIN pgjob" in text and "# user's own line" in text


def test_init_refuses_a_directory_that_is_not_a_home(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    done = run_pgjob("init", "--home", str(tmp_path))
    assert done.returncode == 4
    assert "not empty and is not a pgjob home" in done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_init_in_a_place_without_write_access_says_so(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    done = run_pgjob("init", "--home", str(locked / "home"))
    assert done.returncode == 4
    assert "not writable" in done.stderr and "Traceback" not in done.stderr


def test_missing_binaries_list_every_place_looked(tmp_path):
    done = run_pgjob("init", "--home", str(tmp_path / "h"), "--pg-bin", str(tmp_path))
    assert done.returncode == 5
    assert str(tmp_path) in done.stderr and "initdb" in done.stderr


def test_settings_file_records_the_binaries_used(home_path):
    settings = open_home(home_path).settings()
    assert binaries.has_programs(settings.pg_bin)


def test_a_wrong_password_is_refused(server):
    found = server.endpoint()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=found.host, port=found.port, user=found.user,
                        dbname=found.database, password="not-the-password")


def test_the_superuser_cannot_connect_over_tcp(server, home_path):
    found = server.endpoint()
    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects"):
        psycopg.connect(host=found.host, port=found.port, user="postgres",
                        dbname="postgres",
                        passfile=str(home_path / "secrets" / "superuser.pgpass"))


def test_the_app_role_cannot_reach_other_databases(server):
    found = server.endpoint()
    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects"):
        psycopg.connect(host=found.host, port=found.port, user=found.user,
                        dbname="postgres", passfile=found.passfile)


def test_endpoint_file_is_private_and_complete(server, home_path):
    assert mode(home_path / "endpoint.json") == 0o600
    data = json.loads((home_path / "endpoint.json").read_text())
    for key in ("host", "port", "database", "user", "job_id", "node", "pid", "started_at",
                "generation", "system_identifier"):
        assert key in data
    assert data["state"] == "serving" and data["system_identifier"].isdigit()


SCHEMA_FACTS = {
    "columns": "select table_name, column_name, data_type, udt_name, is_nullable, "
               "coalesce(column_default, '') from information_schema.columns "
               "where table_schema = 'public'",
    "constraints": "select conrelid::regclass::text, conname, pg_get_constraintdef(oid) "
                   "from pg_constraint where connamespace = 'public'::regnamespace",
    "indexes": "select indexname, indexdef from pg_indexes where schemaname = 'public'",
    "enums": "select typname, enumlabel, enumsortorder from pg_enum "
             "join pg_type on pg_type.oid = enumtypid",
    "versions": "select version_num from alembic_version",
}


def _schema_of(conn) -> dict:
    return {name: sorted(conn.execute(query).fetchall()) for name, query in SCHEMA_FACTS.items()}


postgresql_proc = factories.postgresql_proc(
    executable=str(binaries.find() / "pg_ctl"), port=None)
postgresql = factories.postgresql("postgresql_proc")


def test_init_makes_no_optuna_tables_and_the_first_worker_makes_optunas_own(server, postgresql):
    """init leaves the study database empty (any Optuna version may come first); pgjob's
    storage then applies its prepared copy of Optuna's schema, which must be exactly what
    the installed Optuna creates itself (on a plain server started by pytest-postgresql),
    plus pgjob's own two tables."""
    import optuna

    import pgjob

    with server.endpoint().connect() as conn:
        assert conn.execute("select count(*) from pg_tables "
                            "where schemaname = 'public'").fetchone()[0] == 0
    info = postgresql.info
    storage = optuna.storages.RDBStorage(
        f"postgresql+psycopg://{info.user}@{info.host}:{info.port}/{info.dbname}")
    storage.engine.dispose()
    assert schema.optuna_schema_revision() == schema.PREPARED_REVISION, \
        "Optuna's schema changed: regenerate pgjob/optuna_schema.sql (see its header)"
    ours = pgjob.optuna_storage(server.home.path, wait=30)
    ours.engine.dispose()
    with server.endpoint().connect() as conn:
        conn.execute("drop table pgjob_heartbeats, pgjob_requests")
        mine = _schema_of(conn)
        tables_owner = conn.execute("select distinct tableowner from pg_tables "
                                    "where schemaname = 'public'").fetchall()
    assert mine == _schema_of(postgresql)
    assert tables_owner == [("optuna",)]
    study = optuna.create_study(storage=server.endpoint().sqlalchemy_url(), study_name="ok")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2
