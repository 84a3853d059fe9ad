"""pgbouncer's files as pgjob renders them, without pgbouncer: transaction pooling, TLS
required, and names quoted as in pg_hba.conf."""
from pathlib import Path

from pgjob import pooler


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
    verifier = "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"
    assert pooler.render_userlist('op"tuna', verifier) == f'"op""tuna" "{verifier}"\n'
