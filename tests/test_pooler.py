"""pgbouncer in front of the server (pooler = "pgbouncer"): workers reach PostgreSQL only
through it, over TLS, and it is kept alive, given rotated passwords, and stopped with serve."""
from pathlib import Path

import optuna
import psutil
import psycopg
import pytest

import pgjob
from conftest import Served, run_pgjob, skip_unless_ci
from pgjob import pooler
from pgjob.waiting import until

pytestmark = pytest.mark.pg
POOLED = {"PGJOB_POOLER": "pgbouncer"}


@pytest.fixture
def pooled(home_path, tmp_path):
    if pooler.find() is None:
        skip_unless_ci("pgbouncer is not installed (`./dev test` as root installs it)")
    served = Served(home_path, tmp_path / "serve.log", env=POOLED)
    served.endpoint()
    return served


def _bouncer(served) -> psutil.Process:
    found = [p for p in psutil.Process(served.process.pid).children() if p.name() == "pgbouncer"]
    assert len(found) == 1, found
    return found[0]


def _study_runs(home, name: str, trials: int = 20) -> int:
    study = optuna.create_study(storage=pgjob.optuna_storage(home, wait=60), study_name=name,
                                load_if_exists=True, sampler=optuna.samplers.RandomSampler())
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=trials, n_jobs=2)
    return len(study.trials)


def test_workers_go_through_pgbouncer_over_tls_only(pooled):
    found = pooled.endpoint()
    assert found.pooler == "pgbouncer"
    assert _bouncer(pooled).pid != found.pid
    with found.connect() as conn:  # through pgbouncer, which reaches PostgreSQL's socket
        assert conn.execute("show listen_addresses").fetchone()[0] == ""
    assert _study_runs(pooled.home_path, "pooled") == 20
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(host=found.host, port=found.port, user=found.user,
                        dbname=found.database, passfile=found.passfile, sslmode="disable",
                        connect_timeout=5).close()
    assert "through pgbouncer" in pooled.log.read_text()


def test_a_dead_pgbouncer_is_restarted_and_stops_with_serve(pooled):
    first = _bouncer(pooled)
    first.kill()
    assert until(lambda: len([p for p in psutil.Process(pooled.process.pid).children()
                              if p.name() == "pgbouncer" and p.pid != first.pid]) == 1, 30)
    assert _study_runs(pooled.home_path, "after-restart", trials=5) == 5
    second = _bouncer(pooled)
    assert "pgbouncer exited" in pooled.log.read_text()
    assert pooled.stop() == 0
    assert not second.is_running() or second.status() == psutil.STATUS_ZOMBIE


def test_rotated_password_reaches_pgbouncer(pooled):
    done = run_pgjob("rotate-password", "--home", str(pooled.home_path))
    assert done.returncode == 0, done.stderr
    assert until(lambda: "reloaded with the rotated password" in pooled.log.read_text(), 30)
    fresh = pooled.endpoint()
    with fresh.connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_pgbouncer_settings_are_safe():
    ini = pooler.render_ini(listen="10.1.2.3", port=6432, pg_socket_dir=Path("/tmp/s"), pg_port=5432,
                            database="optuna", workdir=Path("/tmp/s"), cert=Path("/d/server.crt"),
                            key=Path("/d/server.key"), max_clients=2010)
    assert "pool_mode = transaction" in ini
    assert "client_tls_sslmode = require" in ini
    assert "listen_addr = 10.1.2.3" in ini and "auth_type = hba" in ini
    hba = pooler.render_hba("optuna", "optuna", ("10.1.0.0/16",))
    assert hba.splitlines()[0] == 'hostssl "optuna" "optuna" 10.1.0.0/16 scram-sha-256'
    assert hba.splitlines()[-1].endswith("reject")
