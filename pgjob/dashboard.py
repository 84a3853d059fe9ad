"""`pgjob dashboard`: optuna-dashboard on the instance's studies, here or through a tunnel.

optuna-dashboard is an optional extra (`pip install "pgjob[dashboard]"`). It has no login of
its own, so it listens on 127.0.0.1 only: on a shared login node every user of that node
could reach it, which is why docs/remote.md suggests running it on your own machine with
--via. It takes a storage object, so a journal home's studies are shown through Optuna's
JournalStorage on pgjob's backend, here and through the tunnel alike.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable

from .errors import PgJobError, UsageError
from .home import Home
from .tunnel import TUNNEL_SSLMODE, Tunnel

HOST = "127.0.0.1"

INSTALL_HINT = 'pip install "pgjob[dashboard]"'


def require_dashboard():
    """The optuna_dashboard module, or an error that says how to get it."""
    try:
        import optuna_dashboard
    except ImportError:
        raise PgJobError(f"optuna-dashboard is not installed; install it with "
                         f"`{INSTALL_HINT}` (or `pip install optuna-dashboard`)") from None
    return optuna_dashboard


def tunnel_storage(url: str, pooled: bool = False):
    """An Optuna storage on a tunnel's local URL (which stays the same when the server
    moves); pre-ping replaces connections that went to the old server. Behind pgbouncer
    (`pooled`), psycopg must prepare no statements."""
    import optuna

    kwargs = {"pool_pre_ping": True, "pool_size": 2}
    if pooled:
        kwargs["connect_args"] = {"prepare_threshold": None}
    return optuna.storages.RDBStorage(url, skip_table_creation=True, engine_kwargs=kwargs)


def tunnel_journal(tunnel: Tunnel, home: Home, wait: float):
    """A journal home's studies through a tunnel: the journal's backend connects to the
    tunnel's local end (which stays the same when the server moves) with the endpoint's
    database, role and passfile. The dashboard runs no trials, so Optuna's plain
    JournalStorage, without pgjob's heartbeats."""
    import optuna

    from .journal import PgJournalBackend, connect_published

    def through(found):
        return tunnel.local_endpoint(found).connect(timeout=10, sslmode=TUNNEL_SSLMODE)
    backend = PgJournalBackend(home, wait=wait, dial=lambda: connect_published(home, through))
    return optuna.storages.JournalStorage(backend)


def _run(storage, port: int, say: Callable[[str], None]) -> None:
    """Serve the dashboard until Ctrl-C or SIGTERM.

    The HTTP server runs in a thread and the main thread only waits: a signal that landed
    in a request would be swallowed by wsgiref's error handling and never stop it.
    """
    from wsgiref.simple_server import make_server

    app = require_dashboard().wsgi(storage)
    try:
        server = make_server(HOST, port, app)
    except OSError as exc:
        raise UsageError(f"the dashboard cannot listen on {HOST}:{port}: {exc.strerror}; "
                         "choose another port with --port") from None
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    worker.start()
    say(f"dashboard: http://{HOST}:{port}/  (Ctrl-C to stop)")
    try:
        while not stop.wait(1):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
        server.server_close()


def serve_local(home: Home, *, port: int, wait: float, say: Callable[[str], None]) -> None:
    """The dashboard on this machine, on the storage workers use (it follows the server)."""
    from .storage import optuna_storage

    require_dashboard()
    _run(optuna_storage(home.path, wait=wait), port, say)


def serve_through(tunnel: Tunnel, *, port: int, wait: float,
                  say: Callable[[str], None]) -> None:
    """The dashboard on this machine, on the server behind an ssh tunnel that follows it."""
    require_dashboard()
    local = tunnel.open(wait)
    stop = threading.Event()
    follower = threading.Thread(target=tunnel.follow, args=(stop,), daemon=True)
    follower.start()
    try:
        if tunnel.home.settings().storage == "journal":
            storage = tunnel_journal(tunnel, tunnel.home, wait)
        else:
            storage = tunnel_storage(local.sqlalchemy_url(TUNNEL_SSLMODE), bool(local.pooler))
        _run(storage, port, say)
    finally:
        stop.set()
        follower.join(5)
        tunnel.close()
