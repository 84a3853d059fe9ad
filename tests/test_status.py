"""`pgjob status`: healthy, degraded and down, for people and for scripts."""
import json

import pytest

from conftest import run_pgjob

pytestmark = pytest.mark.pg


def status(home_path, *extra):
    return run_pgjob("status", "--home", str(home_path), *extra)


def test_healthy_server_reports_what_a_user_needs(server, home_path):
    import optuna

    optuna.create_study(storage=server.endpoint().sqlalchemy_url(), study_name="empty-study")
    done = status(home_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for text in ("pgjob: healthy", "PostgreSQL 15", "connections:", "disk free:",
                 "study empty-study: no trials", "127.0.0.1"):
        assert text in done.stdout


def test_json_status_counts_trials_by_state(server, home_path, tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=server.endpoint().sqlalchemy_url(), study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    study.ask()  # one left running
    done = status(home_path, "--json")
    facts = json.loads(done.stdout)
    assert done.returncode == 0 and facts["state"] == "healthy"
    assert facts["studies"] == {"s": {"COMPLETE": 3, "RUNNING": 1}}
    assert facts["max_connections"] == 2 * 8 + 8 and facts["connections"] >= 1
    assert "password" not in done.stdout


def test_not_published_is_down_with_exit_2(home_path):
    done = status(home_path)
    assert done.returncode == 2
    assert "pgjob: down" in done.stdout and "no server is published" in done.stdout


def test_published_but_dead_is_down(server, home_path):
    endpoint = (home_path / "endpoint.json").read_text()
    server.stop()
    (home_path / "endpoint.json").write_text(endpoint)  # as if the job vanished uncleanly
    done = status(home_path, "--json")
    assert done.returncode == 2
    assert json.loads(done.stdout)["reachable"] is False


def test_connections_near_the_limit_are_degraded(home_path, tmp_path):
    from conftest import Served

    run_pgjob("init", "--home", str(home_path), "--workers", "1", check=True)
    served = Served(home_path, tmp_path / "serve.log")
    found = served.endpoint()
    # 10 connections, 3 kept for the superuser: 5 held and status's own make 6 of 7 in use,
    # leaving one for pgjob's own brief connections (its sweeps, backups)
    held = [found.connect() for _ in range(5)]
    try:
        done = status(home_path)
        assert done.returncode == 1, done.stdout
        assert "pgjob: degraded" in done.stdout and "connections workers may use are in use" in done.stdout
    finally:
        for conn in held:
            conn.close()
        served.stop()


def test_status_names_the_optuna_schema_or_says_there_is_none_yet(server, home_path):
    import optuna

    done = status(home_path)  # a fresh home: init makes no Optuna tables
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("optuna:      no Optuna tables yet (the first worker's Optuna will create them)"
            in done.stdout)
    assert json.loads(status(home_path, "--json").stdout)["optuna_schema"] is None

    optuna.create_study(storage=server.endpoint().sqlalchemy_url(), study_name="first")
    facts = json.loads(status(home_path, "--json").stdout)
    assert facts["optuna_schema"] == {"alembic_revision": "v3.2.0.a", "schema_version": 12,
                                      "library_version": optuna.__version__}
    assert (f"optuna:      alembic revision v3.2.0.a, schema_version 12, set up by Optuna "
            f"{optuna.__version__}") in status(home_path).stdout


def test_an_unreadable_optuna_schema_is_degraded_and_the_rest_still_shown(server, home_path):
    import optuna

    optuna.create_study(storage=server.endpoint().sqlalchemy_url(), study_name="kept")
    with server.endpoint().connect() as conn:  # the owner can take its own right away
        conn.execute("revoke select on public.alembic_version from current_user")
    done = status(home_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "pgjob: degraded" in done.stdout
    assert "optuna:      schema unreadable (permission denied for table alembic_version)" in done.stdout
    assert "cannot read which Optuna schema the study database has" in done.stdout
    for text in ("connections:", "study kept: no trials", "disk free:"):
        assert text in done.stdout
